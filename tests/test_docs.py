"""docs/architecture.md describes what exists: every file it names (in prose, in the package tree) and every path in backticks is in the repository
(a bare file name must exist somewhere under disagg/, kernels/, bench/ or deploy/)."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ["disagg", "kernels", "bench", "deploy", "tests", "scripts", "docs"]


def _named_paths(text: str) -> set[str]:
    # file names anywhere (prose, the package tree), and paths in backticks
    names = set(re.findall(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.(?:py|yaml|json|jinja))\b", text))
    for token in re.findall(r"`([^`\s]+)`", text):
        if token.startswith(("/", "http", "--", "$")) or "*" in token or "<" in token:
            continue
        if re.fullmatch(r"[\w./-]+\.(py|yaml|yml|json|md|sh|jinja|toml)|[\w-]+/([\w-]+/)*", token):
            names.add(token)
    return names


def _exists(name: str) -> bool:
    if (REPO / name).exists() or (REPO / "disagg" / name).exists():
        return True
    if "/" not in name.rstrip("/"):
        return any(any((REPO / root).rglob(name.rstrip("/"))) for root in ROOTS)
    return False


def test_architecture_doc_names_only_what_exists():
    text = (REPO / "docs" / "architecture.md").read_text()
    names = _named_paths(text)
    assert len(names) > 20  # the doc really names the code
    missing = sorted(n for n in names if not _exists(n))
    assert missing == []
