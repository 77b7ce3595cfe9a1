"""A download mirror on 127.0.0.1 for tests (no network): serves a folder laid out as
DATASETS_MIRROR expects (<set>/<file>), counts the requests for each file, and can
be slowed down to make concurrent downloads overlap."""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.dataset_files import write_archives


class Mirror:
    def __init__(self, folder: Path, url: str) -> None:
        self.folder, self.url = folder, url
        self.gets: Counter[str] = Counter()  # path -> GET requests
        self.delay_s = 0.0

    def add(self, name: str, **kwargs: int) -> dict[str, str]:
        """Serve the set's archives (tests/dataset_files.py write_archives); {file: md5}."""
        return write_archives(self.folder / name, name, **kwargs)


@contextmanager
def serve_mirror(folder: Path) -> Iterator[Mirror]:
    mirror: Mirror

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name
            mirror.gets[self.path] += 1
            time.sleep(mirror.delay_s)
            try:
                super().do_GET()
            except (BrokenPipeError, ConnectionResetError):
                pass  # torchvision's redirect probe hangs up without reading the body

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    mirror = Mirror(folder, f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield mirror
    finally:
        server.shutdown()
        server.server_close()
