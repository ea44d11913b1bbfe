"""The Django example end to end with `epio run`: its `[release] command` (migrate)
runs against its PostgreSQL before the release serves, and `createsuperuser` is
answered at its prompts through the real CLI in a pseudo-terminal."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.run.helpers import RunNode, skip_reason
from tests.util import CHECKOUT

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


class DjangoRunTests(SynchronousTestCase):
    def setUp(self) -> None:
        if skip_reason():
            self.skipTest(skip_reason() or "")
        self.node = RunNode(addons={"postgres_admin_url": PG_ADMIN})
        self.addCleanup(self.node.close)
        self.node.start(seed=False)
        # the app's database on the shared server goes with the app: destroy keeps it
        # for the grace period, purge drops it (else the next run of this test on the
        # same PostgreSQL finds app_hello migrated already)
        self.addCleanup(self.node.epio, "apps", "purge", "hello", "--confirm", "hello",
                        check=False)
        self.addCleanup(self.node.epio, "apps", "destroy", "hello", "--confirm", "hello",
                        check=False)

    def test_migrate_on_deploy_and_createsuperuser(self) -> None:
        """Deploying examples/django runs `manage.py migrate` in the release phase;
        `epio run -- python manage.py createsuperuser` prompts for the username,
        email and password twice, and the user exists afterwards."""
        import pexpect

        code, out, err = self.node.epio("deploy", str(CHECKOUT / "examples" / "django"),
                                        "--app", "hello", "--poll", "0.5", check=False,
                                        timeout=300)
        self.assertEqual(code, 0, out + err)
        self.assertIn("Release phase succeeded", out)
        self.assertIn("Applying notes.0001_initial... OK", out)
        child = self.node.spawn("run", "--app", "hello", "--", "python", "manage.py",
                                "createsuperuser", timeout=30)
        self.addCleanup(lambda: child.terminate(force=True))
        child.expect("Username")
        child.send("boss\r")
        child.expect("Email address")
        child.send("boss@example.com\r")
        child.expect("Password")
        child.send("s3cret-Pass-123\r")
        child.expect(r"Password \(again\)")
        child.send("s3cret-Pass-123\r")
        child.expect("Superuser created successfully")
        child.expect(pexpect.EOF)
        child.close()
        self.assertEqual(child.exitstatus, 0)
        _, out, _ = self.node.epio(
            "run", "--app", "hello", "-q", "--", "python", "manage.py", "shell", "-c",
            "from django.contrib.auth.models import User; "
            "print(list(User.objects.filter(is_superuser=True).values_list('username')))")
        self.assertEqual(out.strip().splitlines()[-1], "[('boss',)]")
        # `epio psql` (epio.cli.addons) is an epio run session too
        _, out, _ = self.node.epio("psql", "--app", "hello", "-T", "-q", "--", "-At", "-c",
                                   "select username from auth_user")
        self.assertEqual(out.strip(), "boss")
