"""lensdyn.analyses: one module per phenomenon.

Each module is a set of pure functions of captured tensors plus one ``measure()`` that takes a
``Capture`` (or a model and prompts) and returns a ``Result``.
"""
