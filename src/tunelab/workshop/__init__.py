"""The data workshop: build instruction data from raw sources, mix, clean, split, distil.

Every verb is a plain function (``build_recipe``, ``build_builtin``, ``mix``,
``clean``, ``distill``); ``tunelab data build|mix|clean|distill`` are thin wrappers
(see ``tunelab.workshop.cli``).
"""
