"""Attacks `fingpt-audit` (simulations/audit.py) runs against federations it trains: canaries and
membership inference, an empirical epsilon lower bound, what the operator learns from one update, and a
backdoor bank. One module per attack; none of them is imported by a bank or the operator."""
