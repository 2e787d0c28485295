"""The HTTP door onto the engine: ``remotefs serve`` and ``remotefs mount --serve``.

Every path of urls.txt is served at ``/PATH`` by an ASGI app (`app.HttpDoor`) that hypercorn
runs on the daemon's own trio loop (`server`), next to the FUSE mount when there is one, over
the same tree of names and the same engine. `ranges` is the pure part of HTTP (Range and the
conditional headers of RFC 9110), `pages` the index and status pages, and `listen` the
checks made before the daemon starts (the address, loopback or not, the token file).

Nothing here is imported by the library or the mount unless a daemon serves HTTP: hypercorn
is the ``[serve]`` extra.
"""
