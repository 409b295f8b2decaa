"""`fingpt-infer`: publish a run's global model, predict with explanations, serve it over HTTP.

Uses model/ (the published folder, variants), client/ (data configs and batching), privacy/
(redaction, audit log) and server/publish; knows nothing of Flower.
"""
