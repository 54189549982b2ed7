"""The model runner: the only modules that import torch and transformers.

Everything here runs on the executor's worker thread (or a preprocessing thread for
`prompt`), never on the event loop.
"""
