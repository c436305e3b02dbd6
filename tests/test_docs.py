"""docs/ stays in step with the code: every public kernel name is described in docs/kernels.md,
and every relative link in docs/ points at a file that exists."""
import re
from pathlib import Path

import pytest

import recscore.kernels

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_public_kernel_name_is_described():
    text = (DOCS / "kernels.md").read_text()
    missing = [name for name in recscore.kernels.__all__ if not re.search(rf"\b{re.escape(name)}\b", text)]
    assert not missing, f"docs/kernels.md does not describe {missing}"


@pytest.mark.parametrize("page", sorted(path.name for path in DOCS.glob("*.md")))
def test_relative_links_resolve(page):
    text = (DOCS / page).read_text()
    targets = [target for target in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in target]
    broken = [target for target in targets if not (DOCS / target).exists()]
    assert not broken, f"docs/{page} links to missing files: {broken}"
