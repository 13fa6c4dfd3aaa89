"""What a run shows: metrics.jsonl and the progress bar, plots, `agpo compare`, the console, redaction
of secrets in logs. Imports only runtime/; never imports training code, so any layer may log.
"""
