"""tunelab studio: a local web app over a workspace of runs (``tunelab studio``).

- ``workspace``: the folder guard (no path outside it) and listings;
- ``forms``: the New-run form from ``tunelab.config`` (one schema for CLI, YAML and UI);
- ``jobs``: detached ``tunelab train``/``eval`` processes, their records, stop and re-attach;
- ``runs``, ``compare``: what the Runs and Compare pages show, read from the folders;
- ``preflight``: data stats, rendered preview, hardware decision, memory estimate;
- ``chat``: the playground through the serve engine;
- ``app``, ``cli``: the FastAPI app and the command. The page is ``static/`` (no build step).
"""

from tunelab.studio.cli import register, run_studio

__all__ = ["register", "run_studio"]
