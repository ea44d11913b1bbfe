from django.core.cache import cache
from django.core.management.base import BaseCommand

from entries.queue import SIGNED, redis_client


class Command(BaseCommand):
    help = "Thank everyone who signs the guestbook (the worker process)."

    def handle(self, *args, **options):
        client = redis_client()
        print("thankyou: waiting for entries on %s" % SIGNED, flush=True)
        while True:
            item = client.blpop([SIGNED], timeout=30)
            if item is None:
                continue
            entry_id = int(item[1])
            cache.set("thanked:%d" % entry_id, True, None)
            print("thankyou: thanked entry %d" % entry_id, flush=True)
