"""epio.domain: each rule of the shared vocabulary, and that every layer uses it."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from epio import domain


class NameTests(SynchronousTestCase):
    def test_app_names(self) -> None:
        """An app name is a DNS label of 1-30 characters starting with a letter; the
        refusal names the value and says the rule in words."""
        for ok in ["a", "my-app", "a1", "a" * 30]:
            self.assertIsNone(domain.app_name_problem(ok), ok)
        for bad in ["", "A", "1app", "app-", "my_app", "a" * 31, "ab\n", None, 3]:
            self.assertEqual(domain.app_name_problem(bad),
                             f"{bad!r} is not a valid app name: {domain.APP_NAME_RULE}")

    def test_process_types(self) -> None:
        """A process type is lowercase, starts with a letter, 1-30 characters; the
        platform's epio-* types are reserved to it (but still valid process types for
        the store and the runner, which run the add-on servers)."""
        for ok in ["web", "worker_2", "clock-x", "w" * 30]:
            self.assertIsNone(domain.process_type_problem(ok), ok)
        for bad in ["Worker", "1st", "_x", "-x", "w" * 31, "web\n", "a.b", "", None]:
            self.assertEqual(domain.process_type_problem(bad),
                             f"not a valid process type: {domain.PROCESS_TYPE_RULE}")
        for ptype in domain.SERVICE_PROCESS_TYPES:
            self.assertIsNotNone(domain.PROCESS_TYPE.fullmatch(ptype))
            self.assertEqual(domain.process_type_problem(ptype),
                             f"reserved: {domain.RESERVED_PROCESS_RULE}")

    def test_hostnames(self) -> None:
        """The whole-name pattern and the label pattern agree on every label."""
        for ok in ["example.org", "*.example.org", "a-b.c0.example", "x" * 63 + ".org"]:
            self.assertIsNotNone(domain.HOSTNAME.fullmatch(ok), ok)
        for bad in ["-a.org", "a-.org", "A.org", "x" * 64 + ".org", "a..org", "*.*.org"]:
            self.assertIsNone(domain.HOSTNAME.fullmatch(bad), bad)
            labels = bad.removeprefix("*.").split(".")
            self.assertFalse(all(domain.HOSTNAME_LABEL.fullmatch(lb) for lb in labels), bad)

    def test_a_process_type_makes_a_log_source(self) -> None:
        """The longest process type with a 4-digit instance number, and the longest
        cron job name, are log sources the logger accepts."""
        self.assertIsNotNone(domain.LOG_SOURCE.fullmatch("w" * domain.PROCESS_TYPE_MAX + ".9999"))
        self.assertIsNotNone(domain.LOG_SOURCE.fullmatch("cron." + "n" * domain.CRON_NAME_MAX))
        self.assertIsNone(domain.LOG_SOURCE.fullmatch("cron." + "n" * (domain.CRON_NAME_MAX + 1)))


class OneSourceTests(SynchronousTestCase):
    def test_layers_use_the_one_rule(self) -> None:
        """The store, the runner, the add-ons code, the logger and the API document use
        the domain's rules themselves, not copies that could drift."""
        from epio.addons import APP_NAME as addons_app
        from epio.addons.services import SERVICE_PROCESS_TYPES
        from epio.api import spec
        from epio.logs.records import APP_RE, SOURCE_RE
        from epio.runner import supervisor, users
        from epio.store import store

        with self.assertRaises(store.InvalidName) as e:
            store.validate_app_name("ab-")
        self.assertEqual(str(e.exception), domain.app_name_problem("ab-"))
        self.assertIs(store.PROCESS_TYPE, domain.PROCESS_TYPE)
        self.assertIs(supervisor.PROCESS_TYPE, domain.PROCESS_TYPE)
        self.assertIs(users.APP_NAME, domain.APP_NAME)
        self.assertIs(addons_app, domain.APP_NAME)
        self.assertIs(APP_RE, domain.APP_NAME)
        self.assertIs(SOURCE_RE, domain.LOG_SOURCE)
        self.assertIs(SERVICE_PROCESS_TYPES, domain.SERVICE_PROCESS_TYPES)
        self.assertEqual(spec.APP_NAME, domain.APP_NAME.pattern)
        self.assertEqual(spec.PROCESS_TYPE, domain.PROCESS_TYPE.pattern)
        self.assertEqual(spec.HOSTNAME, domain.HOSTNAME.pattern)
        from epio.store import runs

        self.assertEqual((runs.KINDS, runs.STATES, runs.LIVE),
                         (domain.RUN_KINDS, domain.RUN_STATES, domain.RUN_LIVE))

    def test_states(self) -> None:
        """The runner's state machine has a transition entry for every state a runner
        reports; the store's instance states are those plus pending; a deploy's
        transition table covers its states and its final states go nowhere."""
        from epio.runner.supervisor import TRANSITIONS, State

        self.assertIs(State, domain.RunnerState)
        self.assertEqual(set(TRANSITIONS), set(domain.RUNNER_STATES))
        self.assertEqual(set(domain.INSTANCE_STATES), {"pending", *domain.RUNNER_STATES})
        self.assertLessEqual(set(domain.LIVE_STATES), set(domain.INSTANCE_STATES))
        self.assertEqual(set(domain.DEPLOY_TRANSITIONS), set(domain.DEPLOY_STATES))
        for final in domain.DEPLOY_FINAL:
            self.assertEqual(domain.DEPLOY_TRANSITIONS[final], frozenset())
        self.assertLessEqual(domain.DEPLOY_INITIAL, set(domain.DEPLOY_STATES))
