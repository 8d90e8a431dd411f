"""The tests' S3 server: moto's server app on 127.0.0.1, on a port the kernel picks, with one cache.

Usage: ``python tests/motoserver.py PORT_FILE``; the port is written to PORT_FILE once it listens
(no free-port race between parallel test workers). moto looks its backend up per request by listing
its own package directory (a stat per service, ~170): about half its CPU per request, for a list that
never changes while the server runs. It is read once here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(port_file: Path) -> None:
    import moto.backends
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    modules = tuple(moto.backends.list_of_moto_modules())
    moto.backends.list_of_moto_modules = lambda: modules  # type: ignore[assignment]
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    partial = port_file.with_suffix(".partial")
    partial.write_text(str(server.server_port))
    os.replace(partial, port_file)
    server.serve_forever()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
