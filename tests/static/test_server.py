"""The runner's static file server on real files (docs/static.md): who may ask, what
is served, headers, conditional requests, gzip, ranges, and which releases are served."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from epio.routing import static_token
from epio.runner.static import content_type, read_static_facts
from tests.static.helpers import (
    DIGEST1,
    DIGEST2,
    SECRET,
    Driver,
    Inst,
    Spec,
    data_dir,
    make_image,
    make_server,
)

CSS = b"body { color: red; }\n" * 100  # compressible, > 256 bytes
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="epio-static-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.image = make_image(
            self.tmp / "img1",
            {"/static": "app/static", "/media": "/data/media", "/site": "app/site"},
            expires={"/static/img": 86400},
            files={"app/static/app.css": CSS, "app/static/img/logo.png": PNG,
                   "app/static/empty.txt": b"", "app/site/index.html": b"<h1>home</h1>",
                   "app/app.py": b"SECRET = 'source code'\n",
                   "epio/secret.txt": b"not static\n"})
        self.instances = [Inst(Spec("hello", 1, DIGEST1, os.getuid()))]
        self.server, self.images, self.reactor = make_server(
            self.tmp, {DIGEST1: self.image}, self.instances)
        self.http = Driver(self.server)

    def get(self, path: str, **kw: object) -> object:
        return self.http.request("GET", path, **kw)  # type: ignore[arg-type]


class ServingTests(Base):
    def test_file_with_type_length_and_cache_headers(self) -> None:
        """A static file is served with its bytes, Content-Type, Content-Length, a
        quoted ETag, Cache-Control public with the default max-age, Expires and
        nosniff."""
        r = self.http.request("GET", "/static/img/logo.png")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, PNG)
        self.assertEqual(r.headers["content-type"], "image/png")
        self.assertEqual(r.headers["content-length"], str(len(PNG)))
        self.assertRegex(r.headers["etag"], r'^"[0-9a-f]{32}"$')
        self.assertEqual(r.headers["cache-control"], "public, max-age=86400")
        self.assertIn("expires", r.headers)
        self.assertEqual(r.headers["x-content-type-options"], "nosniff")
        self.assertIn("last-modified", r.headers)
        r = self.http.request("GET", "/static/app.css", headers={"Accept-Encoding": "identity"})
        self.assertEqual(r.headers["cache-control"], "public, max-age=3600")
        self.assertEqual(r.headers["content-type"], "text/css; charset=utf-8")
        self.assertEqual(r.body, CSS)

    def test_query_string_ignored_and_empty_file(self) -> None:
        """``?v=3`` does not change the file; an empty file is a 200 with length 0."""
        self.assertEqual(self.http.request("GET", "/static/app.css?v=3").status, 200)
        r = self.http.request("GET", "/static/empty.txt")
        self.assertEqual((r.status, r.body, r.headers["content-length"]), (200, b"", "0"))

    def test_head_has_headers_and_no_body(self) -> None:
        """HEAD answers the GET's status and headers (Content-Length included), no body."""
        get = self.http.request("GET", "/static/img/logo.png")
        head = self.http.request("HEAD", "/static/img/logo.png")
        self.assertEqual(head.status, 200)
        self.assertEqual(head.headers["content-length"], str(len(PNG)))
        self.assertEqual(head.headers["etag"], get.headers["etag"])
        self.assertTrue(head.raw.endswith(b"\r\n\r\n"), head.raw[-40:])

    def test_other_methods_405(self) -> None:
        """POST, PUT, DELETE are answered 405 with Allow: GET, HEAD."""
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            r = self.http.request(method, "/static/app.css", body=b"x=1")
            self.assertEqual(r.status, 405, method)
            self.assertEqual(r.headers["allow"], "GET, HEAD")

    def test_no_directory_listing_index_html_served(self) -> None:
        """A directory is never listed (404); ``dir/`` serves its index.html."""
        self.assertEqual(self.get("/static/").status, 404)  # type: ignore[attr-defined]
        self.assertEqual(self.get("/static/img/").status, 404)  # type: ignore[attr-defined]
        self.assertEqual(self.get("/static/img").status, 404)  # type: ignore[attr-defined]
        r = self.http.request("GET", "/site/")
        self.assertEqual((r.status, r.body), (200, b"<h1>home</h1>"))
        self.assertEqual(r.headers["content-type"], "text/html; charset=utf-8")

    def test_missing_file_404_and_outside_prefix_404(self) -> None:
        """Unknown files and paths outside every static prefix are 404 with no-store."""
        r = self.http.request("GET", "/static/nope.css")
        self.assertEqual(r.status, 404)
        self.assertEqual(r.headers["cache-control"], "no-store")
        self.assertEqual(self.http.request("GET", "/app.py").status, 404)
        self.assertEqual(self.http.request("GET", "/staticx/app.css").status, 404)


class AuthorisationTests(Base):
    def test_no_header_forged_token_or_other_apps_token_403(self) -> None:
        """Without X-Epio-Static, with a made-up token, or with another app's valid
        token under this app's name, the answer is 403 and no file byte."""
        r = self.http.request("GET", "/static/app.css", app=None)
        self.assertEqual(r.status, 403)
        r = self.http.request("GET", "/static/app.css", token="0" * 32)
        self.assertEqual(r.status, 403)
        r = self.http.request("GET", "/static/app.css", token=static_token(SECRET, "other"))
        self.assertEqual(r.status, 403)
        r = self.http.request("GET", "/static/app.css",
                              token=static_token(b"another cluster secret!", "hello"))
        self.assertEqual(r.status, 403)
        self.assertNotIn(b"color: red", r.raw)

    def test_unknown_app_403(self) -> None:
        """A valid token for an app this node serves nothing of is refused too."""
        r = self.http.request("GET", "/static/app.css", app="other")
        self.assertEqual(r.status, 403)


class TraversalTests(Base):
    def test_dot_dot_in_any_spelling_404(self) -> None:
        """``..`` (plain, percent-encoded, with an encoded slash) never leaves the static
        directory: the image's own files and the source code stay unreadable."""
        for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py",
                     "/static/%2E%2E%2F%2E%2E%2Fepio/secret.txt", "/static/img/../../app.py",
                     "/static/..", "/static/%00app.css", "/static/app.css%00.png"):
            r = self.http.request("GET", path)
            self.assertEqual(r.status, 404, path)
            self.assertNotIn(b"source code", r.raw)

    def test_image_symlink_out_refused_inside_followed(self) -> None:
        """In an image, a symlink leaving the static directory is a 404; one that stays
        inside it is served."""
        static = self.image / "app" / "static"
        os.symlink("../app.py", static / "escape.txt")
        os.symlink("/etc/hostname", static / "abs.txt")
        os.symlink("..", static / "up")
        os.symlink("app.css", static / "alias.css")
        for path in ("/static/escape.txt", "/static/abs.txt", "/static/up/app.py"):
            self.assertEqual(self.http.request("GET", path).status, 404, path)
        r = self.http.request("GET", "/static/alias.css", headers={"Accept-Encoding": ""})
        self.assertEqual((r.status, r.body), (200, CSS))


class DataDirTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.data = data_dir(self.tmp)
        (self.data / "media").mkdir()
        (self.data / "media" / "up.txt").write_bytes(b"uploaded\n")
        (self.tmp / "outside.txt").write_bytes(b"node secret\n")

    def test_files_under_data_served(self) -> None:
        """``/media = %(data_directory)s/media`` serves the app's data dir files."""
        r = self.http.request("GET", "/media/up.txt")
        self.assertEqual((r.status, r.body), (200, b"uploaded\n"))

    def test_no_symlink_followed_under_data(self) -> None:
        """Under /data, a symlink is never followed, even one that stays inside: the
        app writes there while the server reads."""
        media = self.data / "media"
        os.symlink(str(self.tmp / "outside.txt"), media / "out.txt")
        os.symlink("up.txt", media / "in.txt")
        os.symlink(str(self.tmp), media / "dir")
        for path in ("/media/out.txt", "/media/in.txt", "/media/dir/outside.txt"):
            r = self.http.request("GET", path)
            self.assertEqual(r.status, 404, path)
            self.assertNotIn(b"node secret", r.raw)

    def test_symlinked_static_root_refused(self) -> None:
        """The app replacing its static directory by a symlink gets 404s."""
        shutil.rmtree(self.data / "media")
        os.symlink(str(self.tmp), self.data / "media")
        self.assertEqual(self.http.request("GET", "/media/outside.txt").status, 404)

    def test_image_static_dir_planted_as_link_out_refused(self) -> None:
        """A static directory that is itself a link leaving the image (planted by build
        code in an image made before builds checked it) serves nothing."""
        from epio.runner.static import NotServed, open_in_image

        image = self.tmp / "img"
        (image / "app").mkdir(parents=True)
        outside = self.tmp / "host"
        outside.mkdir()
        (outside / "cluster-secret").write_text("s3cret")
        os.symlink(str(outside), image / "app" / "static")
        with self.assertRaises(NotServed):
            open_in_image(str(image / "app" / "static"), ["cluster-secret"], str(image))
        (image / "app" / "real").mkdir()
        (image / "app" / "real" / "a.css").write_text("body{}")
        fd, _ = open_in_image(str(image / "app" / "real"), ["a.css"], str(image))
        os.close(fd)

    def test_fifo_is_404_without_hanging(self) -> None:
        """A FIFO in the data dir is not a file: 404 at once (the open does not block)."""
        os.mkfifo(self.data / "media" / "pipe.txt")
        self.assertEqual(self.http.request("GET", "/media/pipe.txt").status, 404)

    def test_file_of_another_owner_refused(self) -> None:
        """With UIDs switched, a file under /data not owned by the app's UID (a hard link
        to somebody else's file) is refused."""
        if os.geteuid() != 0:
            self.skipTest("needs root to chown")
        uid = 23456
        self.instances[0] = Inst(Spec("hello", 1, DIGEST1, uid))
        self.server.uid_check = True
        self.server.prepared.clear()
        self.server.refresh()
        os.chown(self.data, uid, uid)
        os.chown(self.data / "media", uid, uid)
        os.chown(self.data / "media" / "up.txt", uid, uid)
        (self.data / "media" / "root.txt").write_bytes(b"root's\n")
        self.assertEqual(self.http.request("GET", "/media/up.txt").status, 200)
        self.assertEqual(self.http.request("GET", "/media/root.txt").status, 404)


class ConditionalTests(Base):
    def test_if_none_match_304(self) -> None:
        """The ETag sent back in If-None-Match gives a 304 with the ETag and caching
        headers and no body; another tag gives the file."""
        r = self.http.request("GET", "/static/img/logo.png")
        etag = r.headers["etag"]
        r2 = self.http.request("GET", "/static/img/logo.png", headers={"If-None-Match": etag})
        self.assertEqual(r2.status, 304)
        self.assertEqual(r2.headers["etag"], etag)
        self.assertEqual(r2.headers["cache-control"], "public, max-age=86400")
        self.assertTrue(r2.raw.endswith(b"\r\n\r\n"))
        r3 = self.http.request("GET", "/static/img/logo.png",
                               headers={"If-None-Match": '"abc", W/' + etag})
        self.assertEqual(r3.status, 304, "weak comparison, list")
        r4 = self.http.request("GET", "/static/img/logo.png", headers={"If-None-Match": '"x"'})
        self.assertEqual((r4.status, r4.body), (200, PNG))

    def test_if_modified_since_304_unless_if_none_match_differs(self) -> None:
        """If-Modified-Since at or after Last-Modified gives 304; when If-None-Match is
        also there and does not match, the file is sent (If-None-Match wins)."""
        r = self.http.request("GET", "/static/img/logo.png")
        lm = r.headers["last-modified"]
        r2 = self.http.request("GET", "/static/img/logo.png", headers={"If-Modified-Since": lm})
        self.assertEqual(r2.status, 304)
        r3 = self.http.request("GET", "/static/img/logo.png",
                               headers={"If-Modified-Since": lm, "If-None-Match": '"old"'})
        self.assertEqual(r3.status, 200)
        r4 = self.http.request("GET", "/static/img/logo.png",
                               headers={"If-Modified-Since": "Thu, 01 Jan 1981 00:00:00 GMT"})
        self.assertEqual(r4.status, 200)

    def test_changed_data_file_gets_new_etag(self) -> None:
        """A file under /data rewritten by the app gets a new ETag (no stale 304)."""
        d = data_dir(self.tmp)
        (d / "media").mkdir()
        f = d / "media" / "a.txt"
        f.write_bytes(b"one\n")
        e1 = self.http.request("GET", "/media/a.txt").headers["etag"]
        f.write_bytes(b"two, longer\n")
        r = self.http.request("GET", "/media/a.txt", headers={"If-None-Match": e1})
        self.assertEqual((r.status, r.body), (200, b"two, longer\n"))


class GzipTests(Base):
    def test_text_gzipped_when_accepted(self) -> None:
        """CSS for a client accepting gzip comes gzipped (Content-Encoding, Vary, its own
        ETag) and decompresses to the file; without Accept-Encoding it is identity."""
        r = self.http.request("GET", "/static/app.css", headers={"Accept-Encoding": "gzip, br"})
        self.assertEqual(r.headers["content-encoding"], "gzip")
        self.assertEqual(r.headers["vary"], "Accept-Encoding")
        self.assertLess(len(r.body), len(CSS))
        self.assertEqual(gzip.decompress(r.body), CSS)
        plain = self.http.request("GET", "/static/app.css")
        self.assertNotIn("content-encoding", plain.headers)
        self.assertEqual(plain.body, CSS)
        self.assertNotEqual(plain.headers["etag"], r.headers["etag"])
        self.assertEqual(plain.headers["vary"], "Accept-Encoding")
        r2 = self.http.request("GET", "/static/app.css",
                               headers={"Accept-Encoding": "gzip", "If-None-Match":
                                        r.headers["etag"]})
        self.assertEqual(r2.status, 304)

    def test_binary_and_large_not_gzipped_and_switch_off(self) -> None:
        """PNG is never gzipped; files above static_gzip_max_kb are sent as they are;
        static_gzip off sends CSS as it is."""
        r = self.http.request("GET", "/static/img/logo.png", headers={"Accept-Encoding": "gzip"})
        self.assertNotIn("content-encoding", r.headers)
        self.server.gzip_max_bytes = 100
        self.server.facts = type(self.server.facts)(1 << 20)
        r = self.http.request("GET", "/static/app.css", headers={"Accept-Encoding": "gzip"})
        self.assertNotIn("content-encoding", r.headers)
        self.assertEqual(r.body, CSS)
        self.assertNotRegex(r.headers["etag"], r'^"[0-9a-f]{32}"$', "no content hash")
        self.server.gzip_max_bytes = 1 << 20
        self.server.gzip = False
        self.server.facts = type(self.server.facts)(1 << 20)
        r = self.http.request("GET", "/static/app.css", headers={"Accept-Encoding": "gzip"})
        self.assertNotIn("content-encoding", r.headers)

    def test_head_gzipped_no_body(self) -> None:
        """HEAD with gzip accepted gives the gzipped length and no body."""
        r = self.http.request("HEAD", "/static/app.css", headers={"Accept-Encoding": "gzip"})
        self.assertEqual(r.headers["content-encoding"], "gzip")
        self.assertLess(int(r.headers["content-length"]), len(CSS))
        self.assertTrue(r.raw.endswith(b"\r\n\r\n"))


class RangeTests(Base):
    def test_single_range_and_unsatisfiable(self) -> None:
        """bytes=0-3 gives 206 with Content-Range and 4 bytes; bytes=-4 the last 4; a
        start past the end gives 416 with bytes */size."""
        r = self.http.request("GET", "/static/img/logo.png", headers={"Range": "bytes=0-3"})
        self.assertEqual((r.status, r.body), (206, PNG[:4]))
        self.assertEqual(r.headers["content-range"], f"bytes 0-3/{len(PNG)}")
        r = self.http.request("GET", "/static/img/logo.png", headers={"Range": "bytes=-4"})
        self.assertEqual((r.status, r.body), (206, PNG[-4:]))
        r = self.http.request("GET", "/static/img/logo.png",
                              headers={"Range": f"bytes={len(PNG)}-"})
        self.assertEqual(r.status, 416)
        self.assertEqual(r.headers["content-range"], f"bytes */{len(PNG)}")
        r = self.http.request("GET", "/static/img/logo.png",
                              headers={"Range": "bytes=0-3", "If-Range": '"stale"'})
        self.assertEqual((r.status, r.body), (200, PNG))


class ReleaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="epio-static-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.old = make_image(self.tmp / "old", {"/static": "app/static"},
                              files={"app/static/a.css": b"old a", "app/static/old.css": b"o"})
        self.new = make_image(self.tmp / "new", {"/static": "app/static", "/assets": "epio/st"},
                              files={"app/static/a.css": b"new a", "epio/st/x.js": b"x"})

    def test_served_only_while_healthy_newest_first_then_released(self) -> None:
        """A starting instance's image is mounted but not served; healthy releases are
        served newest first with files only in the old release still found; the
        announcement lists the prefixes; a release without web instances is unmounted."""
        instances = [Inst(Spec("hello", 1, DIGEST1, 20000)),
                     Inst(Spec("hello", 2, DIGEST2, 20000), state="starting"),
                     Inst(Spec("hello", 2, DIGEST2, 20000, process_type="worker"))]
        server, images, _ = make_server(self.tmp, {DIGEST1: self.old, DIGEST2: self.new},
                                        instances)
        http = Driver(server)
        self.assertEqual(images.refs, {DIGEST1: 1, DIGEST2: 1})
        self.assertEqual(http.request("GET", "/static/a.css").body, b"old a")
        self.assertEqual(server.announcement(), {
            "static": "127.0.0.1:7000", "static_prefixes": {"hello": ["/static"]}})
        instances[1].state = "healthy"
        server.refresh()
        self.assertEqual(http.request("GET", "/static/a.css").body, b"new a")
        self.assertEqual(http.request("GET", "/static/old.css").body, b"o")
        self.assertEqual(http.request("GET", "/assets/x.js").body, b"x")
        self.assertEqual(server.announcement()["static_prefixes"],
                         {"hello": ["/assets", "/static"]})
        del instances[0]
        server.refresh()
        self.assertEqual(images.refs[DIGEST1], 0)
        self.assertEqual(http.request("GET", "/static/old.css").status, 404)
        instances.clear()
        server.refresh()
        self.assertEqual(images.refs[DIGEST2], 0)
        self.assertEqual(server.announcement(), {"static": "127.0.0.1:7000",
                                                 "static_prefixes": {}})
        self.assertEqual(http.request("GET", "/static/a.css").status, 403)

    def test_missing_image_is_logged_not_served(self) -> None:
        """An image the node cannot mount leaves the app unannounced (no crash)."""
        server, _, _ = make_server(self.tmp, {}, [Inst(Spec("hello", 1, DIGEST1, 20000))])
        self.assertEqual(server.announcement()["static_prefixes"], {})
        self.flushLoggedErrors()


class FactsTests(SynchronousTestCase):
    def test_static_facts_checked(self) -> None:
        """Build facts are checked: absolute paths outside /data and ``..`` are dropped;
        prefixes sort longest first; expires keys are URL paths."""
        tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, tmp, True)
        make_image(tmp / "i", {"/static": "app/static", "/x": "/etc", "/y": "app/../..",
                               "/static/big": "/data/big", "/d": "/data", "bad": "app"},
                   expires={"/static": 60, "/": 5})
        dirs, expires = read_static_facts(tmp / "i")
        self.assertEqual([(d.prefix, d.image_rel, d.data_rel) for d in dirs], [
            ("/static/big", None, ("big",)), ("/static", "app/static", ()), ("/d", None, ())])
        self.assertEqual(expires, [("/static", 60), ("/", 5)])

    def test_content_types(self) -> None:
        """Common web types get the right Content-Type; unknown ones octet-stream."""
        self.assertEqual(content_type("a.js"), "application/javascript; charset=utf-8")
        self.assertEqual(content_type("a.svg"), "image/svg+xml; charset=utf-8")
        self.assertEqual(content_type("a.woff2"), "font/woff2")
        self.assertEqual(content_type("A.JPG"), "image/jpeg")
        self.assertEqual(content_type("noext"), "application/octet-stream")
