"""SubSpec Server: an OpenAI-compatible HTTP front end for the SubSpec engine.

The API process (FastAPI on uvicorn) validates requests, applies the chat template, queues requests and
streams tokens; one worker process owns the GPU and the engine. Nothing in this package imports torch at
module level: only `server.worker.load_engine`, run inside the worker process, imports the engine.
"""
