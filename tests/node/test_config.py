"""Configuration: validation at start-up, every error at once, docs in sync."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from epio.config import ConfigError, load_config
from epio.config.docs import render
from epio.config.schema import SCHEMA
from epio.config.typed import render as render_settings

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
SETTINGS = Path(__file__).resolve().parents[2] / "epio" / "config" / "settings.py"


class LoadConfigTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = Path(self.mktemp())
        path.write_text(text)
        return str(path)

    def test_defaults(self) -> None:
        """With no file every key has its documented default."""
        config = load_config(None)
        for section, keys in SCHEMA.items():
            for name, key in keys.items():
                self.assertEqual(config[section][name], key.default)

    def test_values_read(self) -> None:
        """Values from the file replace the defaults; ints are accepted for floats."""
        config = load_config(self.write('[node]\ndomain = "apps.example.com"\n[bus]\nrequest_timeout = 5\n'))
        self.assertEqual(config["node"]["domain"], "apps.example.com")
        self.assertEqual(config["bus"]["request_timeout"], 5)

    def test_all_errors_reported_together(self) -> None:
        """A file with several errors reports every one of them in one exception."""
        path = self.write(
            "[lb]\nlisten = 5\nbogus = 1\n[nope]\nx = 1\n[bus]\nrequest_timeout = -1\n"
            '[store]\nurl = "mysql://x"\n'
        )
        with self.assertRaises(ConfigError) as cm:
            load_config(path)
        errors = cm.exception.errors
        self.assertEqual(len(errors), 5, errors)
        text = str(cm.exception)
        for fragment in [
            "lb.bogus: unknown key",
            "[nope]: unknown section",
            "bus.request_timeout: must be > 0",
            "lb.listen: must be of type str",
            "store.url: must start with sqlite:/// or postgresql://",
        ]:
            self.assertIn(fragment, text)
        self.assertIn(path, text)

    def test_checks_across_keys(self) -> None:
        """A deploy upload limit that cannot fit in one bus message is refused at start."""
        with self.assertRaises(ConfigError) as cm:
            load_config(self.write("[api]\nmax_upload_mb = 300\n"))
        self.assertIn("api.max_upload_mb (300 MiB) must be at least 1 MiB under "
                      "bus.max_message_size", str(cm.exception))
        load_config(self.write("[api]\nmax_upload_mb = 300\n[bus]\n"
                               "max_message_size = 400000000\n"))

    def test_uid_range_checked(self) -> None:
        """The app UID range is refused at load when inverted, reaching into system
        accounts, or beyond the kernel's UIDs; a custom range reaches the api's
        allocation and the runner's check (one source: runner.uid_min/uid_max)."""
        from epio.api.settings import ApiSettings
        from epio.runner.supervisor import Settings

        for text, fragment in [
            ("uid_min = 50000\nuid_max = 40000", "runner.uid_min (50000) must not be above"),
            ("uid_min = 999", "runner.uid_min: must be >= 1000, not 999"),
            ("uid_max = 4294967295", "runner.uid_max (4294967295) must be at most"),
        ]:
            with self.assertRaises(ConfigError) as cm:
                load_config(self.write("[runner]\n" + text + "\n"))
            self.assertIn(fragment, str(cm.exception))
        config = load_config(self.write("[runner]\nuid_min = 47000\nuid_max = 47999\n"))
        self.assertEqual(ApiSettings.from_config(config).uids, (47000, 47999))
        runner = Settings.from_config(config.settings.runner)
        self.assertEqual((runner.uid_min, runner.uid_max), (47000, 47999))
        self.assertEqual((Settings().uid_min, Settings().uid_max), ApiSettings().uids)

    def test_app_limits_read(self) -> None:
        """api.max_apps_per_user and api.app_changes_* become the api's app limits, and
        api.destroyed_grace/purge_interval/purge_timeout its purge settings; negative
        values are refused."""
        from epio.api.settings import ApiSettings

        config = load_config(self.write("[api]\nmax_apps_per_user = 3\n"
                                        "app_changes_per_window = 7\napp_changes_window = 60\n"
                                        "destroyed_grace = 86400\npurge_interval = 30\n"
                                        "purge_timeout = 9\n"))
        settings = ApiSettings.from_config(config)
        limits = settings.app_limits
        self.assertEqual((limits.max_apps, limits.changes, limits.window), (3, 7, 60.0))
        self.assertEqual((settings.destroyed_grace, settings.purge_interval,
                          settings.purge_timeout), (86400.0, 30.0, 9.0))
        with self.assertRaises(ConfigError) as cm:
            load_config(self.write("[api]\nmax_apps_per_user = -1\n"))
        self.assertIn("api.max_apps_per_user: must be >= 0", str(cm.exception))
        defaults = ApiSettings.from_config(load_config(None)).app_limits
        self.assertEqual(defaults, ApiSettings().app_limits)

    def test_bad_toml(self) -> None:
        """A file that is not TOML says so, with the file name."""
        path = self.write("[lb\n")
        with self.assertRaises(ConfigError) as cm:
            load_config(path)
        self.assertIn("not valid TOML", str(cm.exception))

    def test_missing_file(self) -> None:
        """A missing file is a clear error, not a traceback."""
        with self.assertRaises(ConfigError) as cm:
            load_config("/nonexistent/epio.toml")
        self.assertIn("cannot read", str(cm.exception))

    def test_overrides_win(self) -> None:
        """Command-line overrides replace file values and are validated too."""
        path = self.write('[lb]\nlisten = "tcp:1"\n')
        config = load_config(path, {"lb": {"listen": "tcp:2"}})
        self.assertEqual(config["lb"]["listen"], "tcp:2")
        with self.assertRaises(ConfigError):
            load_config(path, {"store": {"url": "nope"}})

    def test_booleans_are_not_integers(self) -> None:
        """true is not accepted where an integer is expected."""
        int_keys = [(s, n) for s, ks in SCHEMA.items() for n, k in ks.items() if k.kind is int]
        if not int_keys:
            self.skipTest("no integer keys")
        section, name = int_keys[0]
        with self.assertRaises(ConfigError):
            load_config(self.write(f"[{section}]\n{name} = true\n"))


class DocsTests(SynchronousTestCase):
    def test_configuration_reference_current(self) -> None:
        """docs/configuration.md is exactly what the schema generates (every key documented)."""
        self.assertEqual(
            DOCS.read_text(),
            render(),
            "docs/configuration.md is stale: run python -m epio.config.docs > docs/configuration.md",
        )

    def test_typed_settings_current(self) -> None:
        """epio/config/settings.py is exactly what the schema generates."""
        self.assertEqual(
            SETTINGS.read_text(),
            render_settings(),
            "epio/config/settings.py is stale: run "
            "python -m epio.config.typed > epio/config/settings.py",
        )


class TypedSettingsTests(SynchronousTestCase):
    def test_settings_mirror_the_values_frozen(self) -> None:
        """Every key of every section is an attribute of config.settings with the
        validated value; lists are tuples, tables read-only, nothing can be assigned."""
        import attrs

        config = load_config(None, {"lb": {"workers": 3, "trusted_proxies": ["10.0.0.1"]}})
        settings = config.settings
        for section, keys in SCHEMA.items():
            typed = getattr(settings, section)
            for name in keys:
                value = getattr(typed, name)
                raw = config[section][name]
                if isinstance(raw, list):
                    self.assertIsInstance(value, tuple)
                    self.assertEqual(len(value), len(raw))
                else:
                    self.assertEqual(value, raw, f"{section}.{name}")
        self.assertEqual(settings.lb.workers, 3)
        self.assertEqual(settings.lb.trusted_proxies, ("10.0.0.1",))
        with self.assertRaises(attrs.exceptions.FrozenInstanceError):
            settings.lb.workers = 4  # type: ignore[misc]
        with self.assertRaises(TypeError):
            settings.cluster.nexus[0]["router"] = "x"  # type: ignore[index]
