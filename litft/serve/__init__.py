"""OpenAI-compatible HTTP server over the generation engine (``litft serve``); needs ``pip install 'litft[serve]'``.

``create_app(llm, model_name)`` builds the FastAPI app; :class:`Scheduler` is its continuous-batching loop.
Nothing is imported here so that ``import litft.serve`` works without FastAPI installed.
"""
