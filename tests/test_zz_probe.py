import os, time, json
import httpx
from tests.support.service import write_random, wait_until

def test_probe(make_service, layout, azurite, azurite_container):
    s = make_service(APP_MAX_ATTEMPTS="1")
    class C:
        def post(self, path, **kw):
            with httpx.Client(base_url=s.url, timeout=5) as cl:
                return cl.post(path, **kw)
        def get(self, path, **kw):
            with httpx.Client(base_url=s.url, timeout=5) as cl:
                return cl.get(path, **kw)
    c = C()
    def show(label, r):
        print(label, r.status_code, r.text[:150])
    show("malformed", c.post("/v1/watch/start", content=b"{not json", headers={"content-type": "application/json"}))
    show("int", c.post("/v1/watch/start", json={"session_name": 5}))
    show("extra", c.post("/v1/watch/start", json={"session_name": "a", "x": 1}))
    show("list", c.post("/v1/watch/start", json=[]))
    show("null", c.post("/v1/watch/start", content=b"null", headers={"content-type": "application/json"}))
    show("str", c.post("/v1/watch/start", content=b'"x"', headers={"content-type": "application/json"}))
    show("big", c.post("/v1/watch/start", content=b"{" + b" " * 17000 + b"}", headers={"content-type": "application/json"}))
    def gen():
        for _ in range(20):
            yield b" " * 1024
    show("chunked big", c.post("/v1/watch/start", content=gen(), headers={"content-type": "application/json"}))
    show("nested", c.post("/v1/watch/start", content=b"[" * 16000, headers={"content-type": "application/json"}))
    show("nested-ok", c.post("/v1/watch/start", content=b"[" * 5000 + b"]" * 5000, headers={"content-type": "application/json"}))
    show("surrogate", c.post("/v1/watch/start", content=b'{"session_name": "\\ud800"}', headers={"content-type": "application/json"}))
    show("form", c.post("/v1/watch/start", content=b'session_name=x', headers={"content-type": "application/x-www-form-urlencoded"}))
    show("text", c.post("/v1/watch/start", content=b'{"session_name": "x"}', headers={"content-type": "text/plain"}))
    for name in [".", "..", "../x", "a/b", "x"*300, "nul\x00", "日本", "   ", "\t\n", "%2e%2e%2f", ".attempts", "é"*43, "é"*42]:
        show(repr(name)[:30], c.post("/v1/watch/start", json={"session_name": name}))
    show("status", c.get("/v1/status"))
    # invalid utf-8 filename
    s.start_session("bytes")
    p = os.fsencode(str(layout.incoming)) + b"/bad\xff\xfename.bin"
    with open(p, "wb") as f: f.write(b"hello")
    os.utime(p, (time.time()-10, time.time()-10))
    time.sleep(3)
    show("status after bad name", c.get("/v1/status"))
    print(os.listdir(os.fsencode(str(layout.nfs))), [x for x in os.walk(os.fsencode(str(layout.nfs)))])
    print(s.log_text()[-3000:])
