# The twistd/twist plugin: resolved lazily by ServiceMaker, so importing this
# module never imports fauth's code or the reactor.
from twisted.application.service import ServiceMaker

fauth = ServiceMaker(
    "fauth",
    "fauth.process.tap",
    "Forward-authentication gateway (APISIX forward-auth compatible)",
    "fauth",
)
