"""The HTTP shapes: what the routes accept and answer, and how each is built from the job domain's rows.

One module per resource family: ``jobs`` (jobs, their events, datasets, adapters), ``fine_tuning`` (the
OpenAI-compatible ``/v1/files`` and ``/v1/fine_tuning/jobs`` objects), ``analyze`` (``/analyze``), ``chat``
(``/v1/chat/completions``). Nothing outside ``service.api`` imports them:
the worker reads and writes the tables and the domain shapes of ``service.jobs`` only.
"""
