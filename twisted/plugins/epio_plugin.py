"""twistd plugin for epio: ``twistd epio --role=...``; all logic lives in epio.tap."""

from twisted.application.service import ServiceMaker

epio = ServiceMaker(
    "epio",
    "epio.tap",
    "epio node: one service tree hosting any of the roles api, nexus, lb, runner, logger, backup",
    "epio",
)
