"""Key ceremony: who gets which file, and that the operator can never hold the secret key."""

from __future__ import annotations

import hashlib
import shutil
import stat

import pytest

from fingpt_federated.conf import CONFIG_DIR, compose_config
from fingpt_federated.privacy.he_config import he_block_of_file
from fingpt_federated.privacy.he_context import (
    ContextMismatchError,
    HEParams,
    SecretKeyRefused,
    key_ceremony,
    load_public_context,
    load_secret_context,
    main,
)

PARAMS = HEParams.from_config(he_block_of_file(CONFIG_DIR / "privacy" / "he.yaml"))


@pytest.fixture(scope="module")
def ceremony(tmp_path_factory):
    return key_ceremony(PARAMS, tmp_path_factory.mktemp("he"))


def test_ceremony_writes_owner_only_secret_public_file_and_fingerprint(ceremony):
    assert stat.S_IMODE(ceremony.secret.stat().st_mode) == 0o600
    assert ceremony.fingerprint == hashlib.sha256(ceremony.public.read_bytes()).hexdigest()
    assert ceremony.fingerprint in ceremony.fingerprint_file.read_text()
    assert ceremony.fingerprint_file.parent == ceremony.secret.parent


def test_operator_context_is_public(ceremony):
    operator = load_public_context(ceremony.public, expected_fingerprint=ceremony.fingerprint)
    assert not operator.context.is_private()
    assert not operator.context.has_secret_key()
    assert not operator.holds_secret_key
    assert operator.fingerprint == ceremony.fingerprint


def test_operator_refuses_a_context_with_the_secret_key(ceremony):
    with pytest.raises(SecretKeyRefused, match="SECRET key"):
        load_public_context(ceremony.secret)


def test_bank_context_is_secret_and_from_the_same_ceremony(ceremony, tmp_path):
    bank = load_secret_context(ceremony.secret, expected_fingerprint=ceremony.fingerprint)
    assert bank.context.is_private()
    assert bank.public().fingerprint == ceremony.fingerprint
    assert not bank.public().context.has_secret_key()
    public_copy = tmp_path / "public.ctx"
    shutil.copyfile(ceremony.public, public_copy)
    public_copy.chmod(0o600)
    with pytest.raises(ValueError, match="no secret key"):
        load_secret_context(public_copy)


def test_secret_context_readable_by_others_is_refused(ceremony, tmp_path):
    leaked = tmp_path / "copy.ctx"
    shutil.copyfile(ceremony.secret, leaked)
    leaked.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_secret_context(leaked)


def test_context_from_another_ceremony_gives_a_clear_error(ceremony, tmp_path):
    other = key_ceremony(PARAMS, tmp_path)
    assert other.fingerprint != ceremony.fingerprint
    with pytest.raises(ContextMismatchError, match="another key ceremony"):
        load_public_context(other.public, expected_fingerprint=ceremony.fingerprint)


def test_ceremony_refuses_to_replace_a_secret_context(ceremony):
    with pytest.raises(FileExistsError, match="refusing"):
        key_ceremony(PARAMS, ceremony.secret.parent)


def test_cli_prints_the_fingerprint(tmp_path, capsys):
    assert main([str(tmp_path)]) == 0
    written = (tmp_path / "he_context.sha256").read_text().split()[0]
    assert written in capsys.readouterr().out


def test_single_modulus_is_rejected_with_the_reason():
    with pytest.raises(ValueError, match="special prime"):
        HEParams(coeff_mod_bit_sizes=(60,))


def test_he_is_a_full_privacy_group_option_like_none():
    he, none = compose_config(["privacy=he"]).privacy, compose_config(["privacy=none"]).privacy
    assert he.he.enabled and not he.dp.enabled and not none.he.enabled and not none.dp.enabled
    assert HEParams.from_config(he.he) == HEParams()  # he.yaml only switches encryption on: HEParams' defaults


def test_key_ceremony_reads_the_he_block_over_its_defaults(tmp_path):
    config = tmp_path / "privacy.yaml"
    config.write_text("he: {max_summands: 16}\n")
    assert HEParams.from_config(he_block_of_file(config)).max_summands == 16
    config.write_text("he: {max_summand: 16}\n")
    with pytest.raises(ValueError, match=r"privacy\.he\.max_summand: Key 'max_summand' not in 'HEConfig'"):
        he_block_of_file(config)
