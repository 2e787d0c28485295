"""A bug hit by one FUSE request must cost that request (EIO), never the whole mount."""

from __future__ import annotations

import errno
import logging

import pyfuse3
import pytest
import trio

from remotefs.fuse.ops import RemoteFsOperations, _never_crash


def test_unexpected_exception_becomes_eio_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    @_never_crash
    async def broken() -> None:
        raise TypeError("a bug")

    with caplog.at_level(logging.ERROR), pytest.raises(pyfuse3.FUSEError) as info:
        trio.run(broken)
    assert info.value.errno == errno.EIO
    assert "internal error in broken" in caplog.text and "a bug" in caplog.text


def test_fuse_errors_pass_through_unchanged() -> None:
    @_never_crash
    async def missing() -> None:
        raise pyfuse3.FUSEError(errno.ENOENT)

    with pytest.raises(pyfuse3.FUSEError) as info:
        trio.run(missing)
    assert info.value.errno == errno.ENOENT


def test_every_request_handler_is_guarded() -> None:
    for name in ("lookup", "getattr", "open", "read", "readdir", "statfs", "getxattr"):
        assert getattr(RemoteFsOperations, name).__wrapped__ is not None, name
