"""A Flask app for epio: `epio deploy examples/flask`."""

import os

from flask import Flask

app = Flask(__name__)


@app.route("/")
def index():
    greeting = os.environ.get("GREETING", "Hello")
    return f"{greeting} from Flask on epio!\n"


@app.route("/health")
def health():
    return "ok\n"
