import os

from celery import Celery

# the app's Redis add-on is both the broker and the result backend
app = Celery("tasks", broker=os.environ.get("REDIS_URL", "redis://localhost:6379/0"),
             backend=os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
app.conf.broker_connection_retry_on_startup = True


@app.task
def add(x, y):
    from billiard.process import current_process

    # which process ran it: a prefork child ("ForkPoolWorker-N"), not the main worker
    return {"sum": x + y, "process": current_process().name, "pid": os.getpid()}
