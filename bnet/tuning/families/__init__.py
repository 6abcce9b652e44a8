"""The built-in model families, one module each; every module here registers its family
(:func:`bnet.tuning.family.register_family`) and is found by its name."""
