"""Using a trained composition (or a baseline): text in, text out for comm-generate, comm-chat
and comm-serve. ``session.Session`` loads the model and its tokenizer once and generates batched,
KV-cached, optionally streamed text."""
