"""`epio stats` for people: values with units and a text chart of the window."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from epio.cli.logs import ASCII_BLOCKS, chart, format_value


class FormatTests(SynchronousTestCase):
    def test_units(self) -> None:
        """Counts per bucket are rates per second, latencies ms, memory MiB, CPU percent
        of one core (not divided by the bucket), bytes sent KiB/s; never an exponent."""
        self.assertEqual(format_value("requests", 21, 10), "2.10 req/s")
        self.assertEqual(format_value("status_5xx", 6, 60), "0.10 req/s")
        self.assertEqual(format_value("error_502", 10, 10), "1.00 req/s")
        self.assertEqual(format_value("latency_p99_ms", 250.0, 10), "250 ms")
        self.assertEqual(format_value("latency_p50_ms", 2.5, 10), "2.5 ms")
        self.assertEqual(format_value("memory_bytes", 30_347_300, 10), "28.9 MiB")
        self.assertEqual(format_value("bytes_out", 10 * 1024 * 10, 10), "10.0 KiB/s")
        self.assertEqual(format_value("cpu_percent", 57.25, 10), "57.2%")
        self.assertEqual(format_value("cpu_percent", 212.0, 60), "212.0%")  # two cores and more
        self.assertEqual(format_value("restarts", 3, 10), "3")

    def test_chart_spans_the_window(self) -> None:
        """Each column is one slice of the window, scaled to the maximum; a slice
        without data is blank, a zero series is the lowest block."""
        points = [[0, 0.0], [10, 5.0], [20, 10.0]]
        self.assertEqual(chart(points, 0, 40, width=4, blocks=ASCII_BLOCKS), "_+@ ")
        self.assertEqual(chart([[2, 0.0]], 0, 10, width=2, blocks=ASCII_BLOCKS), "_ ")
        self.assertEqual(len(chart(points, 0, 40)), 32)
        # the largest value of a slice wins
        self.assertEqual(chart([[0, 1.0], [1, 8.0], [3, 8.0]], 0, 4, width=2,
                               blocks=ASCII_BLOCKS), "@@")
