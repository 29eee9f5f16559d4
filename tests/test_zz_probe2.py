import os, time, unicodedata
from tests.support.service import write_random, wait_until
from tests.support.faults import drop

NAMES = ["new\nline.bin", "tab\there.bin", "back\\slash.bin", "plus+and&eq=semi;.bin", "quotes'\"`.bin",
 "<angle>|pipe*star.bin", " leading-space.bin", "trailing-space.bin ", "trailing-dot.", "...", "a%2Fb.bin", "%", "%%41",
 "emoji-😀.bin", unicodedata.normalize("NFC", "café.bin"), unicodedata.normalize("NFD", "café.bin"),
 "ctrl\x01\x7f.bin", "€" * 85, "~tilde[br]{ce}$!@^.bin", " ", "-", "--help", "?q=1&x=2#frag", "%00", "..bin", "a..b", "CON", "dir\u2215slash.bin", "zero\u200bwidth.bin", "rtl\u202egnp.exe"]

def test_probe(make_service, layout, azurite, azurite_container):
    s = make_service(APP_MAX_ATTEMPTS="1")
    sess = s.start_session("names")
    prefix = f"{sess['date_prefix']}/names/"
    exp = {}
    for i, n in enumerate(NAMES):
        exp[n] = drop(layout.incoming / n, os.urandom(1000 + i))
    def done():
        st = s.status()
        return st if st["processed_ok"] + st["quarantined"] >= len(NAMES) and not st["in_flight"] else None
    st = wait_until(done, 40)
    print(st["processed_ok"], st["quarantined"], st["last_error"])
    blobs = azurite.blob_names(azurite_container, prefix=prefix)
    got = {b[len(prefix):] for b in blobs}
    for n in NAMES:
        if n not in got:
            print("MISSING", repr(n))
        else:
            if azurite.blob_md5(azurite_container, prefix + n) != exp[n]:
                print("BADMD5", repr(n))
    for g in got - set(NAMES):
        print("EXTRA", repr(g))
