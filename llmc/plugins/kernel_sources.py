"""The digest of the C++ kernels' sources (llmc/plugins/csrc), stamped beside the libraries when setup.py builds
them, so that a checkout whose sources changed since (a pull, an edit) is told to rebuild instead of loading
libraries whose op schemas may no longer match (torch aborts the process on such a library). No llmc imports:
setup.py loads this file on its own."""

from __future__ import annotations

import hashlib
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
STAMP = "_C_sources.sha256"  # in the package folder, beside llmc/_C_<level>


def sources_digest(csrc: Path = CSRC) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in csrc.iterdir() if p.suffix in (".cpp", ".h")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
