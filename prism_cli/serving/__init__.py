"""The online half (SPEC 4.1-4.2): a cost model from ``prism bench``, quality floors, an engine with
continuous batching over the elastic runtime, scheduling policies, a simulator and an HTTP server.

Each module imports only earlier stages (runtime, models, data) and its siblings; nothing here
imports ``prism_cli.commands``.
"""
