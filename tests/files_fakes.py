"""Fakes for the Files API's tests (tests/test_files.py, tests/test_file_images.py)."""

from types import SimpleNamespace

from disagg.http.file_store import LocalFiles

VLM = SimpleNamespace(name="vlm", vision=object())  # what the inliners read of a served model
TEXT_ONLY = SimpleNamespace(name="text", vision=None)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class CountingFiles(LocalFiles):
    """The local store, counting the reads that move a file's bytes."""

    def __init__(self, store):
        super().__init__(store)
        self.reads = 0

    async def get(self, tenant, file_id, param="file_id"):
        self.reads += 1
        return await super().get(tenant, file_id, param)
