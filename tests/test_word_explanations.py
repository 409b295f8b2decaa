"""Word-level explanations: pieces merged into the text's words with their spans, fillers listed only when they
carry the attribution, spans still redacted by the audit log, and the published model explains in words."""

from __future__ import annotations

import pytest
from federation_helpers import config, tiny_model  # noqa: F401
from infer_fixtures import load_table, train_and_publish, write_table

from fingpt_federated.infer.explain import CARRY_SHARE, merge_words, token_offsets, top_words
from fingpt_federated.infer.loading import open_model
from fingpt_federated.infer.predictor import Predictor
from fingpt_federated.model.build import build_model
from fingpt_federated.privacy.audit import AuditLog

pytestmark = pytest.mark.usefixtures("tiny_setting")

TEXT = "EPS for the quarter decreased to $0.42, compared with euro-denominated peers."


@pytest.fixture(scope="module")
def tokenizer():
    return build_model(tiny_model(), 3, 0)[1]


def pieces_of(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    special = set(tokenizer.all_special_ids)
    keep = [i for i, token in enumerate(ids) if token not in special]
    return keep, tokenizer.convert_ids_to_tokens([ids[i] for i in keep]), token_offsets(tokenizer, text, ids, 64)


def test_pieces_merge_into_the_texts_words_with_spans_and_summed_scores(tokenizer):
    keep, pieces, spans = pieces_of(tokenizer, TEXT)
    assert spans is not None and len(pieces) > len(TEXT.split())  # the tokenizer splits words: merging is tested
    scores = [1.0] * len(pieces)
    words = merge_words(TEXT, keep, pieces, scores, spans)
    texts = [w.text for w in words]
    assert texts == ["EPS", "for", "the", "quarter", "decreased", "to", "$", "0.42", ",", "compared", "with"] + [
        "euro-denominated",
        "peers",
        ".",
    ]
    assert all(TEXT[w.start : w.end] == w.text for w in words)
    assert sum(w.pieces for w in words) == len(pieces)
    assert sum(w.score for w in words) == pytest.approx(1.0)  # shares of the row's total
    based = words[texts.index("euro-denominated")]
    assert based.score == pytest.approx(based.pieces / len(pieces)) and based.pieces > 1


def test_punctuation_and_stop_words_are_listed_only_when_they_carry_the_attribution(tokenizer):
    keep, pieces, spans = pieces_of(tokenizer, TEXT)
    words = merge_words(TEXT, keep, pieces, [0.0] * len(pieces), spans)
    index = {w.text: i for i, w in enumerate(words)}

    def top(shares: dict[str, float]) -> list[str]:
        scored = [w.__class__(w.text, w.position, shares.get(w.text, 0.001), w.pieces, w.start, w.end) for w in words]
        return [w.text for w in top_words(scored, 3)]

    # today's complaint: "." on top; the word-level list skips it and "the" below the carry share
    assert top({".": 0.2, "the": 0.2, "decreased": 0.15, "EPS": 0.1, "0.42": 0.05}) == ["decreased", "EPS", "0.42"]
    assert top({".": CARRY_SHARE, "decreased": 0.1}) == [".", "decreased", "EPS"]  # "." carries it: listed
    assert "," in index and "$" in index


def test_without_offsets_continuation_pieces_still_merge():
    words = merge_words(None, [1, 2, 3, 4], ["decrease", "##d", "to", "."], [0.1, 0.2, -0.3, 0.4], None)
    assert [(w.text, w.pieces, w.start) for w in words] == [("decreased", 2, None), ("to", 1, None), (".", 1, None)]
    assert words[0].score == pytest.approx(0.3)


def test_a_published_model_explains_in_words_with_their_spans(tmp_path):
    folder = train_and_publish(tmp_path / "published", ["fp32"])
    data = load_table(write_table(tmp_path / "rows.csv", 4, seed=2))
    model, _ = open_model(folder, "fp32")
    predictions = Predictor(model, batch_size=4).predict(data)
    for text, prediction in zip(data.texts or [], predictions, strict=True):
        words = prediction.explanation["tokens"]
        assert words and all(text[w["start"] : w["end"]] == w["token"] for w in words)
        assert not any(w["token"].startswith("##") for w in words)


def test_the_audit_log_masks_merged_words_that_overlap_pii(tokenizer, tmp_path):
    text = "Refund to jane.doe@example.com approved, call +1 (555) 010-0199 today."
    keep, pieces, spans = pieces_of(tokenizer, text)
    words = merge_words(text, keep, pieces, [1.0] * len(pieces), spans)
    assert "010-0199" in [w.text for w in words]  # one word now, where it was several pieces
    explanation = {"tokens": [w.to_dict() for w in words]}
    entry = AuditLog(tmp_path / "audit.jsonl").record(
        "hash", {"text": text}, {"label": "x", "probabilities": {}}, explanation
    )
    written = [t["token"] for t in entry["explanation"]["tokens"]]
    assert "approved" in written and "Refund" in written
    for secret in ("jane", "doe", "example", "555", "0199"):
        assert not any(secret in token.lower() for token in written), written
