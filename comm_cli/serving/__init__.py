"""comm-serve: a composition behind the OpenAI HTTP API (``comm_cli.serve`` is the command).

``protocol`` speaks OpenAI's JSON (requests, errors, replies, stream chunks), ``scheduler``
batches the requests that arrive together through ``Session.complete`` on a worker thread, and
``app`` is the Starlette application that joins them. Starlette and uvicorn come with the
``serve`` extra (``pip install 'comm-cli[serve]'``); nothing else in comm imports this package.
"""
