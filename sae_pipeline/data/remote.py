"""Stores at fsspec URLs (`s3://bucket/prefix`, `gs://...`; `file://` and plain paths are local folders).

    remote = RemoteStore("s3://bucket/stores/tiny/corpus/blocks.1.hook_resid_post")
    manifest = remote.read_manifest()           # sealed and checked like a local one
    remote.fetch(entry, into=folder)            # a shard downloaded whole, its sha256 checked, or named
    remote.put(local_file, name)                # a shard uploaded whole ...
    remote.put_json(layout.MANIFEST, manifest)  # ... and the manifest after it

Object stores have no rename: a shard is uploaded whole (a single PUT, which an object store makes visible
only once complete) and only then listed in the manifest, which is uploaded last. A reader that sees a
shard in the manifest therefore always finds it complete. Needs `pip install 'sae_pipeline[s3]'` for s3://.
Credentials and endpoints come from the usual environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.integrity.manifest import check_manifest, seal_manifest
from sae_pipeline.integrity.shard import damaged, missing


def is_url(location) -> bool:
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location) -> Path:
    """A plain path or a file:// URL as a local Path."""
    text = str(location)
    return Path(text[len("file://") :] if text.startswith("file://") else text).expanduser()


def join(location: str, *names: str) -> str:
    return "/".join([str(location).rstrip("/"), *names])


class RemoteStore:
    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        try:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except ImportError as err:
            raise UserError(
                f"the store {self.url} needs {err.name or 'an fsspec backend'}: pip install 'sae_pipeline[s3]'"
            ) from None
        except ValueError as err:
            raise UserError(f"the store location {self.url} is not a usable fsspec URL ({err})") from None

    def __str__(self) -> str:
        return self.url

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _call(self, what: str, fn, *args):
        """Run an fsspec call; what a user can cause (credentials, a missing bucket) is one sentence."""
        try:
            return fn(*args)
        except FileNotFoundError:
            bucket = self.root.split("/")[0]
            try:
                exists = self.fs.exists(bucket)
            except Exception:  # noqa: BLE001 - the original error is the one to report
                exists = True
            if not exists:
                raise UserError(
                    f"the bucket {bucket!r} of the store {self.url} does not exist; create it or fix the URL"
                ) from None
            raise
        except PermissionError as err:
            raise UserError(f"access to the store {self.url} was denied while {what} ({err})") from None
        except Exception as err:  # botocore's NoCredentialsError and friends, without importing botocore
            if "credential" in type(err).__name__.lower() or "credentials" in str(err).lower():
                raise UserError(
                    f"no credentials to reach the store {self.url}: set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for a non-AWS server"
                ) from None
            raise

    # ---- reading ----------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return bool(self._call(f"looking for {name}", self.fs.exists, self._path(name)))

    def read_json(self, name: str):
        try:
            data = self._call(f"reading {name}", self.fs.cat_file, self._path(name))
        except FileNotFoundError:
            return None
        return json.loads(data)

    def read_manifest(self) -> dict:
        where = join(self.url, layout.MANIFEST)
        try:
            manifest = self.read_json(layout.MANIFEST)
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"the store manifest {where} is damaged: it is not valid JSON") from None
        if manifest is None:
            raise UserError(
                f"no activation store at {self.url}: {layout.MANIFEST} is missing (run sae-harvest first)"
            )
        if isinstance(manifest, dict) and manifest.get("format_version") != layout.STORE_FORMAT_VERSION:
            raise UserError(
                f"the store manifest {where} has format_version {manifest.get('format_version')!r}"
            )
        check_manifest(manifest, where)
        return manifest

    def problem(self, file: str, sha256: str) -> str | None:
        """One sentence when the object is missing or its bytes differ from the recorded sha256 (streamed)."""
        where = join(self.url, file)
        digest = hashlib.sha256()
        try:
            with self._call(f"reading {file}", self.fs.open, self._path(file), "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
        except FileNotFoundError:
            return missing(where)
        if digest.hexdigest() != sha256:
            return damaged(where)
        return None

    def fetch(self, file: str, sha256: str, into: Path) -> Path:
        """Download one shard whole into `into`, check its sha256, and return the local file."""
        into.mkdir(parents=True, exist_ok=True)
        dest = into / Path(file).name
        tmp = layout.tmp_name(dest)
        try:
            self._call(f"reading {file}", self.fs.get_file, self._path(file), str(tmp))
        except FileNotFoundError:
            raise UserError(missing(join(self.url, file))) from None
        from sae_pipeline.files import sha256_file

        if sha256_file(tmp) != sha256:
            tmp.unlink(missing_ok=True)
            raise UserError(damaged(join(self.url, file)))
        os.replace(tmp, dest)
        return dest

    def list(self, folder: str) -> list[str]:
        try:
            found = self._call(f"listing {folder}", self.fs.ls, self._path(folder), False)
        except FileNotFoundError:
            return []
        return sorted(str(p).rsplit("/", 1)[-1] for p in found)

    # ---- writing ----------------------------------------------------------------------------------
    def put(self, local: Path, name: str) -> None:
        self._call(f"uploading {name}", self.fs.put_file, str(local), self._path(name))

    def put_json(self, name: str, obj) -> None:
        data = (json.dumps(obj, indent=2) + "\n").encode()
        self._call(f"writing {name}", self.fs.pipe_file, self._path(name), data)

    def put_manifest(self, manifest: dict) -> None:
        seal_manifest(manifest)
        self.put_json(layout.MANIFEST, manifest)

    def rm(self, name: str) -> None:
        try:
            self._call(f"deleting {name}", self.fs.rm_file, self._path(name))
        except FileNotFoundError:
            pass

    def check_writable(self) -> None:
        """Fail early, in one sentence, on missing credentials or a missing bucket."""
        self._call("checking the bucket", self.fs.ls, self.root.split("/")[0])
