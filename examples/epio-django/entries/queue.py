import redis

from bundle_config import config

SIGNED = "guestbook:signed"  # ids of new entries, for the thankyou worker


def redis_client():
    return redis.Redis(host=config["redis"]["host"], port=int(config["redis"]["port"]),
                       password=config["redis"]["password"])
