"""Access-log lines and per-app stats reach the pipeline sinks in the agreed shape."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from epio.lb.observe import Observer
from epio.pipeline import MemoryLogSink


class ObserverTests(SynchronousTestCase):
    def test_access_lines_and_stats(self) -> None:
        """One line per request with every field; stats are flat numbers per app."""
        sink = MemoryLogSink()
        o = Observer(sink, sink)
        o.record(100.0, "hello", b"GET", b"/x?y=1", "hello.example.com", 200, 1234, 0.002,
                 0.0123, "127.0.0.1:9000", b"rid-0123456789abcdefgh", "")
        o.record(101.0, "hello", b"POST", b"/up", "hello.example.com", 504, 80, 0.0,
                 30.0, "127.0.0.1:9000", b"rid2", "timeout")
        self.assertEqual(sink.lines, [])
        o.flush()
        (l1, l2) = sink.lines
        self.assertEqual((l1.app, l1.source, l1.timestamp), ("hello", "router", 100.0))
        self.assertEqual(l1.text, "GET /x?y=1 host=hello.example.com status=200 bytes=1234 "
                                  "connect_ms=2.0 service_ms=12.3 backend=127.0.0.1:9000 "
                                  "request_id=rid-0123456789abcdefgh error=-")
        self.assertTrue(l2.text.endswith("error=timeout"))
        o.flush_stats()
        (st,) = sink.stats
        v = st.values
        self.assertEqual((st.app, st.kind), ("hello", "router"))
        self.assertEqual((v["requests"], v["status_2xx"], v["status_5xx"], v["error_timeout"]),
                         (2, 1, 1, 1))
        self.assertEqual((v["latency_le_25ms"], v["latency_le_30000ms"]), (1, 1))
        self.assertTrue(all(isinstance(x, int | float) for x in v.values()))
        o.flush_stats()
        self.assertEqual(len(sink.stats), 1, "no empty reports")

    def test_disabled_access_log_still_counts(self) -> None:
        """With the access log off no line is kept, but stats still count."""
        sink = MemoryLogSink()
        o = Observer(None, sink, enabled=False)
        o.record(1.0, "a", b"GET", b"/", "a", 404, 10, 0.0, 0.001, "", b"r", "no_route")
        o.flush()
        o.flush_stats()
        self.assertEqual(sink.stats[0].values["error_no_route"], 1)
        self.assertEqual(o.pending, [])


class MetricsTests(SynchronousTestCase):
    def test_router_metrics_parse_and_add_up(self) -> None:
        """/metrics carries per-app request counters by status class, error codes and a
        latency histogram; the Prometheus text parser reads them, and counts accumulate
        across stats flushes."""
        from prometheus_client.parser import text_string_to_metric_families

        from epio.lb.observe import Observer, metric_families
        from epio.metrics import MetricsRegistry

        obs = Observer(None, None, enabled=False)
        reg = MetricsRegistry()
        reg.add_collector(lambda: metric_families(obs.cumulative))
        for status, service, code in [(200, 0.004, ""), (200, 0.3, ""), (503, 0.0, "no_backend")]:
            obs.record(0.0, "shop", b"GET", b"/", "shop.localhost", status, 10, 0.0, service,
                       "", b"rid", code)
        obs.flush_stats()
        obs.record(0.0, "shop", b"GET", b"/", "shop.localhost", 200, 5, 0.0, 0.001, "", b"r", "")
        obs.flush_stats()
        fams = {f.name: f for f in text_string_to_metric_families(reg.render().decode())}
        req = {s.labels["class"]: s.value for s in fams["epio_lb_requests"].samples}
        self.assertEqual(req, {"2xx": 3.0, "5xx": 1.0})
        errors = [(s.labels["code"], s.value) for s in fams["epio_lb_errors"].samples]
        self.assertEqual(errors, [("no_backend", 1.0)])
        hist = {(s.name, s.labels.get("le")): s.value
                for s in fams["epio_lb_request_duration_seconds"].samples}
        self.assertEqual(hist[("epio_lb_request_duration_seconds_count", None)], 4.0)
        self.assertEqual(hist[("epio_lb_request_duration_seconds_bucket", "0.005")], 3.0)
        self.assertEqual(hist[("epio_lb_request_duration_seconds_bucket", "+Inf")], 4.0)

    def test_upstream_errors_say_whose_fault(self) -> None:
        """502/504 answers are counted by fault: 'connect' when the instance could not be
        reached, 'app' when it was reached and failed the request; a timeout after the
        response started (status 200) is not a 504 and is not counted there."""
        from prometheus_client.parser import text_string_to_metric_families

        from epio.lb.observe import Observer, metric_families
        from epio.metrics import MetricsRegistry

        obs = Observer(None, None, enabled=False)
        reg = MetricsRegistry()
        reg.add_collector(lambda: metric_families(obs.cumulative))
        for status, code in [(502, "backend_refused"), (504, "connect_timeout"),
                             (502, "backend_closed"), (502, "backend_closed"),
                             (502, "bad_response"), (504, "timeout"), (200, "timeout")]:
            obs.record(0.0, "shop", b"GET", b"/", "shop.localhost", status, 10, 0.0, 0.1,
                       "", b"rid", code)
        obs.flush_stats()
        fams = {f.name: f for f in text_string_to_metric_families(reg.render().decode())}
        got = {(s.labels["status"], s.labels["fault"], s.labels["code"]): s.value
               for s in fams["epio_lb_upstream_errors"].samples}
        self.assertEqual(got, {
            ("502", "connect", "backend_refused"): 1.0, ("504", "connect", "connect_timeout"): 1.0,
            ("502", "app", "backend_closed"): 2.0, ("502", "app", "bad_response"): 1.0,
            ("504", "app", "timeout"): 1.0})
