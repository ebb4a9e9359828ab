"""WordNet for NLTK's METEOR, built from Debian's packages (no download).

No PyPI package ships WordNet. Debian's ``wordnet-base`` (database files) and
``wordnet-sense-index`` (``index.sense``) put WordNet 3.0 under ``/usr/share/wordnet``;
NLTK also wants a ``lexnames`` file, which Debian ships only as the ``lexnames.5WN``
man page. ``install_wordnet`` copies the database files (~36 MB) into
``$TUNELAB_CACHE/nltk_data/corpora/wordnet`` and writes ``lexnames`` from the man page;
``use_wordnet`` points ``nltk.data.path`` there and says whether WordNet loads.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
from pathlib import Path

from tunelab.models.builtin import cache_dir

SYSTEM_WORDNET = Path("/usr/share/wordnet")
LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")
# lexicographer file prefix -> WordNet's syntactic category number (lexnames(5WN))
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def nltk_data_dir() -> Path:
    """The NLTK data folder tunelab manages (holds ``corpora/wordnet``)."""
    return cache_dir() / "nltk_data"


def lexnames_from_man(man_text: str) -> str:
    """Rebuild the ``lexnames`` file (``NN<TAB>name<TAB>category``) from its man page."""
    lines = []
    for raw in man_text.splitlines():
        match = re.match(r"^(\d\d)\t\s*([a-z]+\.[A-Za-z]+)\s*\t", raw)
        if match:
            number, name = match.groups()
            lines.append(f"{number}\t{name}\t{_CATEGORY[name.split('.')[0]]}")
    return "\n".join(lines) + "\n"


def install_wordnet(source: Path | None = None, man_page: Path | None = None,
                    target: Path | None = None) -> Path:
    """Make ``<target>/corpora/wordnet`` from the Debian files; return that folder.

    Files are copied, not linked: NLTK >= 3.10 refuses symlinks leaving its data folder
    and hard-linked files alike. Raises ``FileNotFoundError``
    when the Debian packages are not installed.
    """
    source = source or SYSTEM_WORDNET
    man_page = man_page or LEXNAMES_MAN
    if not (source / "data.noun").is_file() or not (source / "index.sense").is_file():
        raise FileNotFoundError(f"{source}: WordNet database not found "
                                "(apt-get install wordnet-base wordnet-sense-index)")
    if not man_page.is_file():
        raise FileNotFoundError(f"{man_page}: lexnames man page not found (wordnet-base)")
    folder = (target or nltk_data_dir()) / "corpora" / "wordnet"
    text = gzip.decompress(man_page.read_bytes()).decode("utf-8", "replace")
    lexnames = lexnames_from_man(text)
    if lexnames.count("\n") != 45:  # WordNet 3.0 has 45 lexicographer files
        raise ValueError(f"{man_page}: expected 45 lexnames entries, found {lexnames.count(chr(10))}")
    # Build beside the target and swap in at the end, so NLTK never finds half a folder.
    staging = folder.with_name(f".wordnet-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in source.iterdir():
        if not path.is_file():
            continue
        shutil.copyfile(path, staging / path.name)
    (staging / "lexnames").write_text(lexnames, encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return folder


def use_wordnet() -> str | None:
    """Put tunelab's NLTK folder on ``nltk.data.path`` and load WordNet.

    Returns ``None`` when WordNet works, else a one-line reason (METEOR then reports
    itself unavailable rather than a wrong number). When the Debian files exist but the
    cache folder has not been built yet, it is built here.
    """
    import nltk

    root = str(nltk_data_dir())
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        try:
            install_wordnet()
        except (OSError, ValueError) as exc:
            return f"WordNet not found ({exc}); run scripts/setup_assets.py"
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        wordnet.synsets("dog")
    except Exception as exc:  # noqa: BLE001 - any load failure means "unavailable"
        return f"WordNet did not load: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return None
