"""pytest's JUnit XML (argv[1]) as one line of JSON: counts, and each failure's test and message."""

import json
import sys
import xml.etree.ElementTree as ET

cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
failed = [(c, e) for c in cases for e in c if e.tag in ("failure", "error")]
print(json.dumps({
    "tests": len(cases),
    "failed": len(failed),
    "skipped": sum(any(e.tag == "skipped" for e in c) for c in cases),
    "failures": [{"test": c.get("name"), "message": (e.get("message") or "")[:500]} for c, e in failed],
}))
