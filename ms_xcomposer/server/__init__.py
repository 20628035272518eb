"""`ms-xcomposer serve`: an OpenAI-compatible HTTP server (needs the `serve` extra: fastapi, uvicorn).

`protocol`: requests -> chat arguments, responses and errors; `media`: image URLs -> images; `app`: the FastAPI
routes over `ms_xcomposer.scheduler.BatchingEngine`.
"""
