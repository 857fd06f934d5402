"""The test spec: a language-neutral YAML list of cases for one plugin.

```yaml
plugin: plugin.wasm            # relative to this file
name: demo                     # plugin name (default: the file's directory name)
root_id: demo                  # pluginName
config: {header: x-demo}       # plugin configuration: text as is, anything else as JSON
cases:
  - name: adds a header
    config: ...                # this case's own configuration (optional)
    request: {method: GET, path: /, headers: {x-a: "1"}, body: ["chunk 1", "chunk 2"]}
    response: {status: 200, headers: {content-type: text/plain}, body: "hello"}
    expect:
      actions: {request_headers: continue, response_headers: continue}
      immediate_response: {status: 403, body: "denied\n"}    # or body_regex; `false`: none
      upstream: {reached: true, headers: {present: [x-a], absent: [x-b], equal: {x-c: "1"}}, body: ...}
      response: {status: 200, headers: {...}, body: ..., body_regex: ...}
      logs: ["regex", ...]        # each must match some plugin log line ("level message")
      metrics: {demo_requests: 1}
      callouts:                   # the HTTP callouts the plugin makes, in order, and their answers
        - cluster: auth
          method: GET
          path: /auth/alice
          headers: {present: [...], equal: {...}}
          body: ...                # or body_regex
          respond: {status: 200, headers: {...}, body: "ok"}   # or `fail: reset` / `fail: timeout`
```
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wasmgate.devtools.driver import PHASES, Outcome, Reply, Request, Response
from wasmgate.resources.kubeyaml import KubeLoader


class SpecError(Exception):
    """The spec file cannot be read or is not a valid spec; the message says where."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _headers(v: Any) -> list[tuple[str, str]]:
    if v is None:
        return []
    if isinstance(v, dict):
        return [(str(k).lower(), str(val)) for k, val in v.items()]
    if isinstance(v, list):
        out = []
        for item in v:
            if not isinstance(item, list | tuple) or len(item) != 2:
                raise ValueError("headers: a mapping, or a list of [name, value] pairs")
            out.append((str(item[0]).lower(), str(item[1])))
        return out
    raise ValueError("headers: a mapping, or a list of [name, value] pairs")


def _chunks(v: Any) -> list[bytes]:
    if v is None or v == "":
        return []
    if isinstance(v, str):
        return [v.encode()]
    if isinstance(v, list):
        return [str(c).encode() for c in v]
    raise ValueError("body: text, or a list of chunks")


class RequestSpec(_Model):
    method: str = "GET"
    path: str = "/"
    authority: str = "example.com"
    headers: list[tuple[str, str]] = Field(default_factory=list)
    body: list[bytes] = Field(default_factory=list)

    _h = field_validator("headers", mode="before")(lambda v: _headers(v))
    _b = field_validator("body", mode="before")(lambda v: _chunks(v))

    def build(self) -> Request:
        return Request(self.method, self.path, self.authority, list(self.headers), list(self.body))


class ResponseSpec(_Model):
    status: int = 200
    headers: list[tuple[str, str]] = Field(default_factory=list)
    body: list[bytes] = Field(default_factory=list)

    _h = field_validator("headers", mode="before")(lambda v: _headers(v))
    _b = field_validator("body", mode="before")(lambda v: _chunks(v))

    def build(self) -> Response:
        return Response(self.status, list(self.headers), list(self.body))


class HeaderExpect(_Model):
    present: list[str] = Field(default_factory=list)
    absent: list[str] = Field(default_factory=list)
    equal: dict[str, str] = Field(default_factory=dict)

    @field_validator("equal", mode="before")
    @classmethod
    def _eq(cls, v: Any) -> Any:
        return {str(k): str(val) for k, val in v.items()} if isinstance(v, dict) else v


class ReplyExpect(_Model):
    status: int | None = None
    body: str | None = None
    body_regex: str | None = None
    headers: HeaderExpect | None = None


class UpstreamExpect(_Model):
    reached: bool | None = None
    headers: HeaderExpect | None = None
    body: str | None = None
    body_regex: str | None = None


class CalloutReply(_Model):
    status: int = 200
    headers: list[tuple[str, str]] = Field(default_factory=list)
    body: str = ""
    trailers: list[tuple[str, str]] = Field(default_factory=list)

    _h = field_validator("headers", "trailers", mode="before")(lambda v: _headers(v))


class CalloutExpect(_Model):
    cluster: str
    method: str | None = None
    path: str | None = None
    headers: HeaderExpect | None = None
    body: str | None = None
    body_regex: str | None = None
    respond: CalloutReply | None = None
    fail: Literal["reset", "timeout"] | None = None

    @model_validator(mode="after")
    def _answer(self) -> CalloutExpect:
        if (self.respond is None) == (self.fail is None):
            raise ValueError("a callout needs exactly one of `respond` (the canned answer) or `fail` "
                             "(reset or timeout)")
        return self

    def reply(self) -> Reply:
        if self.respond is None:
            return Reply(self.cluster, fail=self.fail)
        r = self.respond
        return Reply(self.cluster, r.status, list(r.headers), r.body.encode(), list(r.trailers))


class Expect(_Model):
    actions: dict[str, str | list[str]] = Field(default_factory=dict)
    immediate_response: ReplyExpect | bool | None = None
    upstream: UpstreamExpect | None = None
    response: ReplyExpect | None = None
    logs: list[str] = Field(default_factory=list)
    metrics: dict[str, int] = Field(default_factory=dict)
    callouts: list[CalloutExpect] | None = None  # None: not checked (and no cluster exists)

    def replies(self) -> list[Reply]:
        return [c.reply() for c in self.callouts or ()]

    @field_validator("actions")
    @classmethod
    def _phases(cls, v: dict[str, Any]) -> dict[str, Any]:
        for phase in v:
            if phase not in PHASES:
                raise ValueError(f"unknown phase {phase!r}; phases: {', '.join(PHASES)}")
        return v


class Case(_Model):
    name: str
    config: Any = None
    request: RequestSpec = Field(default_factory=RequestSpec)
    response: ResponseSpec = Field(default_factory=ResponseSpec)
    expect: Expect = Field(default_factory=Expect)


class Spec(_Model):
    plugin: str = "plugin.wasm"
    name: str = ""
    root_id: str = ""
    config: Any = None
    vm_config: Any = None
    env: dict[str, str] = Field(default_factory=dict)
    cases: list[Case]
    path: Path = Path(".")  # where it was read from

    @property
    def wasm(self) -> Path:
        p = Path(self.plugin)
        return p if p.is_absolute() else self.path.parent / p

    def case_config(self, case: Case) -> Any:
        return case.config if case.config is not None else self.config


def load_spec(path: Path) -> Spec:
    try:
        data = yaml.load(path.read_text(), Loader=KubeLoader)  # as wasmplugin.yaml beside it is read
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping with `plugin` and `cases`")
    try:
        spec = Spec.model_validate({**data, "path": path.resolve()})
    except ValidationError as e:
        lines = [f"{path}: invalid spec:"]
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {where}: {err['msg']}")
        raise SpecError("\n".join(lines)) from None
    if not spec.name:
        spec.name = spec.path.parent.name or "plugin"
    return spec


# ---- checking an outcome -------------------------------------------------------------

def _show(b: bytes) -> str:
    return repr(b.decode("utf-8", errors="replace"))


def _check_headers(where: str, exp: HeaderExpect, headers: list[tuple[str, str]]) -> list[str]:
    fails: list[str] = []
    got: dict[str, str] = {}
    for k, v in headers:
        got.setdefault(k, v)
    for name in exp.present:
        if name.lower() not in got:
            fails.append(f"{where} header {name!r}: expected present, missing")
    for name in exp.absent:
        if name.lower() in got:
            fails.append(f"{where} header {name!r}: expected absent, got {got[name.lower()]!r}")
    for name, value in exp.equal.items():
        actual = got.get(name.lower())
        if actual != value:
            fails.append(f"{where} header {name!r}: expected {value!r}, got "
                         f"{'<missing>' if actual is None else repr(actual)}")
    if fails:
        fails.append(f"  {where} headers were: " + ", ".join(f"{k}: {v}" for k, v in headers))
    return fails


def _check_body(where: str, body: bytes, exact: str | None, regex: str | None) -> list[str]:
    fails = []
    if exact is not None and body != exact.encode():
        fails.append(f"{where} body: expected {exact!r}, got {_show(body)}")
    if regex is not None and not re.search(regex, body.decode("utf-8", errors="replace")):
        fails.append(f"{where} body: expected to match /{regex}/, got {_show(body)}")
    return fails


def check(expect: Expect, out: Outcome) -> list[str]:
    """Every expectation ``out`` does not meet, each as one readable line."""
    fails: list[str] = []
    if out.failed:
        fails.append(f"note: the plugin trapped: {out.failed}")
    for phase, want in expect.actions.items():
        got = out.actions.get(phase, [])
        if isinstance(want, list):
            if [w.lower() for w in want] != got:
                fails.append(f"action {phase}: expected {want}, got {got or 'not called'}")
        elif not got or got[-1] != want.lower():
            fails.append(f"action {phase}: expected {want.lower()}, got {got[-1] if got else 'not called'}")
    ir = expect.immediate_response
    if ir is False and out.local_reply is not None:
        fails.append(f"immediate response: expected none, got {out.local_reply.status} {_show(out.local_reply.body)}")
    elif isinstance(ir, ReplyExpect) or ir is True:
        lr = out.local_reply
        if lr is None:
            fails.append("immediate response: expected one, the plugin sent none "
                         f"(client got {out.status or 'nothing'})")
        elif isinstance(ir, ReplyExpect):
            if ir.status is not None and lr.status != ir.status:
                fails.append(f"immediate response status: expected {ir.status}, got {lr.status}")
            fails += _check_body("immediate response", lr.body, ir.body, ir.body_regex)
            if ir.headers is not None:
                fails += _check_headers("immediate response",
                                        ir.headers, [(k.decode(), v.decode()) for k, v in lr.headers])
    up = expect.upstream
    if up is not None:
        if up.reached is not None and up.reached != out.reached_upstream:
            fails.append(f"upstream: expected the request {'to' if up.reached else 'not to'} reach it; "
                         f"it {'did' if out.reached_upstream else 'did not'}")
        if up.headers is not None:
            fails += _check_headers("upstream", up.headers, out.upstream_headers)
        fails += _check_body("upstream", out.upstream_body, up.body, up.body_regex)
    r = expect.response
    if r is not None:
        if r.status is not None and out.status != r.status:
            fails.append(f"response status: expected {r.status}, got {out.status or 'no response'}")
        if r.headers is not None:
            fails += _check_headers("response", r.headers, out.headers)
        fails += _check_body("response", out.body, r.body, r.body_regex)
    for pattern in expect.logs:
        if not any(re.search(pattern, line) for line in out.logs):
            fails.append(f"logs: no line matches /{pattern}/")
            fails.append("  log lines were:" + "".join(f"\n    {line}" for line in out.logs) if out.logs
                         else "  the plugin logged nothing")
    for name, value in expect.metrics.items():
        got_v = out.metrics.get(name)
        if got_v != value:
            fails.append(f"metric {name}: expected {value}, got {'<undefined>' if got_v is None else got_v}")
    if expect.callouts is not None:
        fails += _check_callouts(expect.callouts, out)
    if fails and fails[0].startswith("note:") and len(fails) == 1:
        return []
    return fails


def _check_callouts(expected: list[CalloutExpect], out: Outcome) -> list[str]:
    fails: list[str] = []
    got = out.callouts
    for i, exp in enumerate(expected):
        where = f"callout {i + 1}"
        if i >= len(got):
            fails.append(f"{where}: expected a call to {exp.cluster!r}, the plugin made none")
            continue
        call = got[i]
        if call.cluster != exp.cluster:
            fails.append(f"{where} cluster: expected {exp.cluster!r}, got {call.cluster!r}")
        if exp.method is not None and call.method != exp.method:
            fails.append(f"{where} method: expected {exp.method!r}, got {call.method!r}")
        if exp.path is not None and call.path != exp.path:
            fails.append(f"{where} path: expected {exp.path!r}, got {call.path!r}")
        if exp.headers is not None:
            fails += _check_headers(where, exp.headers, call.headers)
        fails += _check_body(where, call.body, exp.body, exp.body_regex)
    for i, call in enumerate(got[len(expected):], len(expected) + 1):
        fails.append(f"callout {i}: unexpected call to {call.cluster!r} {call.method} {call.path} "
                     "(answered as a failure)")
    return fails
