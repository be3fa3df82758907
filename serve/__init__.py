"""The Ray Serve application for a trained student (``serve/app.py``) and its request schemas
(``serve/schemas.py``, importable without Ray)."""
