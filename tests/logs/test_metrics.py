"""epio.metrics: the Prometheus text format, checked with prometheus_client's parser
(a test-only dependency)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from epio.metrics import MetricsRegistry, MetricsResource, StatusResource


class ExpositionTests(SynchronousTestCase):
    def make(self) -> MetricsRegistry:
        reg = MetricsRegistry()
        c = reg.counter("epio_test_lines_total", "Lines.\nSecond \\ line.", ["app", "source"])
        c.labels("hello", "web.1").inc(3)
        c.labels('we"ird\\app\n', "router").inc()
        g = reg.gauge("epio_test_queue", "Queue length.")
        g.set(4.5)
        h = reg.histogram("epio_test_latency_seconds", "Latency.", ["app"], buckets=[0.01, 0.1, 1])
        for v in (0.005, 0.05, 0.5, 5):
            h.labels("hello").observe(v)
        return reg

    def test_parses_with_prometheus_parser(self) -> None:
        """Counters, gauges and histograms render to text the reference parser reads back exactly."""
        fams = {f.name: f for f in text_string_to_metric_families(self.make().render().decode())}
        lines = fams["epio_test_lines"]
        self.assertEqual(lines.type, "counter")
        vals = {(s.labels["app"], s.labels["source"]): s.value for s in lines.samples
                if s.name == "epio_test_lines_total"}
        self.assertEqual(vals[("hello", "web.1")], 3)
        self.assertEqual(vals[('we"ird\\app\n', "router")], 1)
        self.assertEqual(fams["epio_test_queue"].samples[0].value, 4.5)
        hist = fams["epio_test_latency_seconds"]
        self.assertEqual(hist.type, "histogram")
        buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
        self.assertEqual(buckets, {"0.01": 1, "0.1": 2, "1.0": 3, "+Inf": 4})
        count = [s.value for s in hist.samples if s.name.endswith("_count")]
        self.assertEqual(count, [4])

    def test_resource(self) -> None:
        """GET /metrics answers with the 0.0.4 content type and the exposition."""
        reg = self.make()
        req = DummyRequest([b""])
        body = MetricsResource(reg).render_GET(req)
        self.assertEqual(req.responseHeaders.getRawHeaders(b"content-type"),
                         [b"text/plain; version=0.0.4; charset=utf-8"])
        self.assertIn(b"epio_test_queue 4.5", body)

    def test_collectors_and_reuse(self) -> None:
        """Registering a name twice returns the same metric; a different shape is refused;
        a failing collector does not break the scrape."""
        reg = self.make()
        self.assertIs(reg.counter("epio_test_lines_total", "x", ["app", "source"]),
                      reg.counter("epio_test_lines_total", "y", ["app", "source"]))
        self.assertRaises(ValueError, reg.gauge, "epio_test_lines_total", "x", ["app", "source"])
        self.assertRaises(ValueError, reg.counter, "no_suffix", "x")

        def broken():
            raise RuntimeError("boom")

        reg.add_collector(broken)
        self.assertIn(b"epio_test_queue", reg.render())
        self.flushLoggedErrors(RuntimeError)

    def test_bus_counters_family(self) -> None:
        """The bus's counters export as one counter family labelled by event."""
        from epio.metrics import bus_families

        reg = MetricsRegistry()
        reg.add_collector(lambda: bus_families({"sent": 3, "rejected.stale": 1}))
        fams = {f.name: f for f in text_string_to_metric_families(reg.render().decode())}
        vals = {s.labels["event"]: s.value for s in fams["epio_bus_events"].samples}
        self.assertEqual(vals, {"sent": 3, "rejected.stale": 1})


    def test_export_by_sums_the_other_labels(self) -> None:
        """``export_by`` renders a family summed over the labels it does not keep (one
        series per kept value), children still counted per full label set; a label the
        metric lacks, or a histogram, is refused."""
        reg = MetricsRegistry()
        c = reg.counter("epio_test_dropped_total", "Dropped.", ["app", "reason"])
        g = reg.gauge("epio_test_bytes", "Bytes.", ["app"])
        for n in range(50):
            c.labels(f"app{n}", "late" if n % 2 else "dup").inc(2)
            g.labels(f"app{n}").set_function(lambda n=n: float(n))
        c.export_by(["reason"])
        g.export_by([])
        fams = {f.name: f for f in text_string_to_metric_families(reg.render().decode())}
        self.assertEqual(sorted((s.labels["reason"], s.value) for s in fams["epio_test_dropped"].samples
                                if s.name == "epio_test_dropped_total"),
                         [("dup", 50.0), ("late", 50.0)])
        self.assertEqual([(s.labels, s.value) for s in fams["epio_test_bytes"].samples],
                         [({}, float(sum(range(50))))])
        self.assertEqual(c.value("app3", "late"), 2)
        c.export_by(None)
        self.assertEqual(len(c.family().samples), 50)
        with self.assertRaises(ValueError):
            c.export_by(["source"])
        with self.assertRaises(ValueError):
            reg.histogram("epio_test_seconds", "S.", ["app"]).export_by([])


class StatusTests(SynchronousTestCase):
    def test_sections_as_json(self) -> None:
        """GET /status answers one JSON object, a section per add_status, computed per request."""
        import json

        reg = MetricsRegistry()
        calls = []
        reg.add_status("router", lambda: calls.append(1) or {"feed": {"stale": True}})
        reg.add_status("nexus", lambda: {"ready": False, "version": 3})
        self.assertRaises(ValueError, reg.add_status, "nexus", dict)
        for n in (1, 2):
            req = DummyRequest([b""])
            body = StatusResource(reg).render_GET(req)
            self.assertEqual(req.responseHeaders.getRawHeaders(b"content-type"),
                             [b"application/json"])
            self.assertEqual(json.loads(body), {"router": {"feed": {"stale": True}},
                                                "nexus": {"ready": False, "version": 3}})
            self.assertEqual(len(calls), n)

    def test_failing_section_says_unavailable_only(self) -> None:
        """A section that raises, or returns what JSON cannot carry, is 'unavailable';
        the exception's text never reaches the response and the other sections still do."""
        import json

        reg = MetricsRegistry()

        def broken() -> dict:
            raise RuntimeError("secret=hunter2 in a traceback")

        reg.add_status("a", broken)
        reg.add_status("b", lambda: {"x": object()})
        reg.add_status("c", lambda: {"ok": 1})
        body = StatusResource(reg).render_GET(DummyRequest([b""]))
        self.assertNotIn(b"hunter2", body)
        self.assertNotIn(b"Traceback", body)
        self.assertEqual(json.loads(body), {"a": {"error": "unavailable"},
                                            "b": {"error": "unavailable"}, "c": {"ok": 1}})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
