"""api/media.py: image URLs behind the SSRF guard. The only traffic is to a local HTTP server on 127.0.0.1; names
resolve through a stand-in resolver, and refused addresses are refused before any connection is made."""
import asyncio
import contextlib
import ipaddress
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from api.media import MediaError, MediaFetcher, is_public
from engine.chat.messages import decode_data_uri
from vision.intake import ImageError

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 100
LOOPBACK = ipaddress.ip_address("127.0.0.1")


class Handler(BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802 -- http.server's name
        self.server.hits.append(self.path)
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        if status == "slow":
            time.sleep(2)
            status = 200
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(ConnectionError):  # the client may hang up early (size and time caps)
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.hits = []
    port = httpd.server_address[1]
    Handler.routes = {
        "/cat.png": (200, {"Content-Type": "image/png"}, PNG),
        "/big.png": (200, {}, b"x" * 5000),
        "/slow.png": ("slow", {}, PNG),
        "/to-cat": (302, {"Location": f"http://images.test:{port}/cat.png"}, b""),
        "/to-internal": (302, {"Location": f"http://internal.test:{port}/cat.png"}, b""),
        "/to-metadata": (301, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/to-loopback": (307, {"Location": f"http://127.0.0.1:{port}/cat.png"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
    }
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


NAMES = {"images.test": ["127.0.0.1"], "internal.test": ["10.0.0.5"], "mixed.test": ["93.184.216.34", "10.1.2.3"],
         "public.test": ["93.184.216.34"]}


async def fake_resolve(host, port):
    if host in NAMES:
        return NAMES[host]
    return [host]  # an IP literal resolves to itself


def fetcher(allowed=("images.test", "internal.test"), allow_loopback=True, **kw):
    """A fetcher that reaches the local test server as `images.test`: 127.0.0.1 is let through, nothing else
    that is not public."""
    ok = (lambda a: a == LOOPBACK or is_public(a)) if allow_loopback else is_public
    return MediaFetcher(list(allowed), resolver=fake_resolve, address_allowed=ok, **kw)


def load(f, url):
    return asyncio.run(f.load(url, "image 1"))


def url(server, path, host="images.test"):
    return f"http://{host}:{server.server_address[1]}{path}"


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
                                     "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1",
                                     "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "ff02::1"])
def test_addresses_that_are_not_public_are_refused(address):
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(address):
    assert is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("target", ["http://127.0.0.1/x.png", "http://169.254.169.254/latest/meta-data",
                                    "http://[::1]/x.png", "http://10.0.0.5/x.png", "http://internal.test/x.png",
                                    "http://mixed.test/x.png"])
def test_private_loopback_and_link_local_targets_are_refused_before_connecting(target):
    allowed = ("127.0.0.1", "169.254.169.254", "::1", "10.0.0.5", "internal.test", "mixed.test")
    guard = MediaFetcher(allowed, resolver=fake_resolve)  # the real address check
    with pytest.raises(MediaError, match="not public") as info:
        load(guard, target)
    assert info.value.code == "image_url_not_allowed"


def test_real_resolution_of_localhost_is_refused():
    with pytest.raises(MediaError, match="not public"):
        load(MediaFetcher(["localhost"]), "http://localhost:9/cat.png")


@pytest.mark.parametrize("target, words", [
    ("http://public.test/cat.png", "public.test is not among them"),
    ("https://evil.example/cat.png", "evil.example is not among them"),
    ("file:///etc/passwd", "only data: URIs and http"),
    ("ftp://images.test/cat.png", "only data: URIs and http"),
    ("/etc/passwd", "only data: URIs and http"),
    ("http://user:pw@images.test/cat.png", "without a user name"),
])
def test_hosts_not_in_the_allow_list_and_other_schemes_are_refused(server, target, words):
    with pytest.raises(MediaError, match=words):
        load(fetcher(), target)
    assert not server.hits or all("passwd" not in h for h in server.hits)


def test_no_allow_list_means_no_urls():
    with pytest.raises(MediaError, match="does not fetch image URLs"):
        load(MediaFetcher([]), "https://upload.wikimedia.org/cat.png")


def test_wildcard_entry_allows_subdomains_only():
    guard = MediaFetcher(["*.example.org"], resolver=fake_resolve)
    assert guard._domain_allowed("img.example.org") and not guard._domain_allowed("example.org")
    assert not guard._domain_allowed("evilexample.org")


def test_allowed_host_is_fetched_through_the_checked_address(server):
    assert load(fetcher(), url(server, "/cat.png")) == PNG


def test_redirect_to_an_allowed_host_is_followed(server):
    assert load(fetcher(), url(server, "/to-cat")) == PNG


@pytest.mark.parametrize("path", ["/to-internal", "/to-metadata"])
def test_redirect_to_a_private_address_is_refused(server, path):
    with pytest.raises(MediaError):
        load(fetcher(allowed=("images.test", "internal.test", "169.254.169.254")), url(server, path))


def test_redirect_to_loopback_is_refused_by_the_real_check(server):
    """A public-looking name whose page redirects to 127.0.0.1: the hop is checked like the first request."""
    first = iter([True])

    def allowed(address):  # lets the first request through (it is the test server), then the real check
        return next(first, False) if address == LOOPBACK else is_public(address)

    guard = MediaFetcher(["images.test", "127.0.0.1"], resolver=fake_resolve, address_allowed=allowed)
    before = len(server.hits)
    with pytest.raises(MediaError, match="not public"):
        load(guard, url(server, "/to-loopback"))
    assert server.hits[before:] == ["/to-loopback"]  # the redirect target was never requested


def test_redirect_loops_stop(server):
    with pytest.raises(MediaError, match="redirected more than"):
        load(fetcher(), url(server, "/loop"))


def test_size_and_time_are_capped(server):
    with pytest.raises(MediaError, match="larger than"):
        load(fetcher(max_bytes=1000), url(server, "/big.png"))
    with pytest.raises(MediaError, match="longer than"):
        load(fetcher(timeout_s=0.5), url(server, "/slow.png"))


def test_http_errors_are_named(server):
    with pytest.raises(MediaError, match="HTTP 404") as info:
        load(fetcher(), url(server, "/missing.png"))
    assert info.value.code == "image_fetch_failed"


def test_data_uris_are_decoded_and_capped():
    import base64

    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert load(MediaFetcher([]), uri) == PNG
    with pytest.raises(ImageError, match="larger than"):
        decode_data_uri(uri, 50)
    with pytest.raises(ImageError, match="not a valid data: URI"):
        decode_data_uri("data:image/png;base64", 1000)
    with contextlib.suppress(ImageError):  # malformed base64 is an ImageError, never another exception
        decode_data_uri("data:image/png;base64,@@@", 1000)
