"""Adapters that plug gradzip into federated-learning frameworks.

- :mod:`gradzip.integrations.flower`: a Flower client Mod and a server strategy wrapper.
- :mod:`gradzip.integrations.appfl`: a compressor class for APPFL.

Each adapter imports its framework lazily (Flower, torch), so importing this package costs
nothing. See docs/integrations.md.
"""
