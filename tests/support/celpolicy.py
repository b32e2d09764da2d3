"""A ValidatingAdmissionPolicy evaluated as the API server does, with cel-python.

Used by the policy's own tests (tests/deploy/test_deploy_startup_taint.py) and as the fake API server's
admission (``FakeKube.admission = Policy(...).denial``), so the syncer's real PATCH meets the
shipped policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import yaml
from celpy.evaluation import CELEvalError

from image_syncer.sandbox.fakekube import AdmissionAttributes, Denial
from support.kubeshapes import admission_request

STARTUP_TAINT_POLICY = (
    Path(__file__).parents[2] / "deploy/syncer/components/startup-taint/admission-policy.yaml"
)


class Policy:
    """A ValidatingAdmissionPolicy evaluated the way the API server does, with cel-python.

    As in apiserver's policy/validating (validator.go, dispatcher.go): a matchCondition or a
    validation that fails to evaluate counts as a refusal under ``failurePolicy: Fail``, with the
    message ``expression '<expression>' resulted in error: <error>`` and no reason (so
    ``Invalid``, HTTP 422); a false validation refuses with its message and reason.
    """

    def __init__(self, policy: dict[str, Any], binding: dict[str, Any]) -> None:
        self.name, self.binding = policy["metadata"]["name"], binding["metadata"]["name"]
        self.env = celpy.Environment()
        spec = policy["spec"]
        assert spec["failurePolicy"] == "Fail"
        self.conditions = [
            (c["expression"], self._compile(c["expression"])) for c in spec["matchConditions"]
        ]
        self.variables = [(v["name"], self._compile(v["expression"])) for v in spec["variables"]]
        self.validations = [
            (v["expression"], self._compile(v["expression"]), self._message(v), v.get("reason"))
            for v in spec["validations"]
        ]

    def _message(self, validation: dict[str, Any]) -> Any:
        if "message" in validation:
            return validation["message"]
        return self._compile(validation["messageExpression"])

    def _compile(self, expression: str) -> Any:
        return self.env.program(self.env.compile(expression))

    def decide(
        self, request: dict[str, Any], obj: dict[str, Any], old: dict[str, Any]
    ) -> list[tuple[str, str]]:
        """(message, reason) of every refusing validation: empty means admitted."""
        activation: dict[str, Any] = {
            "request": celpy.json_to_cel(request),
            "object": celpy.json_to_cel(obj),
            "oldObject": celpy.json_to_cel(old),
        }
        for expression, program in self.conditions:
            try:
                if not program.evaluate(activation):
                    return []  # the policy does not apply to this request
            except CELEvalError as e:
                return [(f"expression '{expression}' resulted in error: {e.args[0]}", "Invalid")]
        variables: dict[str, Any] = {}
        cel_variables = celpy.celtypes.MapType({})
        for name, program in self.variables:
            # A variable that fails to evaluate fails every expression that reads it: keep the
            # error as its value, as cel-go's lazy evaluation does.
            try:
                variables[name] = program.evaluate({**activation, "variables": cel_variables})
            except CELEvalError as e:
                variables[name] = e
            cel_variables = celpy.celtypes.MapType(
                {celpy.celtypes.StringType(k): v for k, v in variables.items()}
            )
        activation["variables"] = cel_variables
        refusals = []
        for expression, program, message, reason in self.validations:
            try:
                if program.evaluate(activation):
                    continue
            except CELEvalError as e:
                error = f"expression '{expression}' resulted in error: {e.args[0]}"
                refusals.append((error, "Invalid"))
                continue
            text = message if isinstance(message, str) else str(message.evaluate(activation))
            refusals.append((text, reason or "Invalid"))
        return refusals

    def admit(self, request: dict[str, Any], obj: dict[str, Any], old: dict[str, Any]) -> list[str]:
        """The messages of the refusing validations: empty means admitted."""
        return [message for message, _ in self.decide(request, obj, old)]

    def denial(self, attributes: AdmissionAttributes) -> Denial | None:
        """The fake API server's admission hook: this policy, on a Node write it matches."""
        if attributes.plural != "nodes" or attributes.operation != "UPDATE":
            return None
        if attributes.user is None or attributes.old is None:
            return None
        request = admission_request(attributes.name, attributes.user)
        refusals = self.decide(request, attributes.obj, attributes.old)
        if not refusals:
            return None
        message, reason = refusals[0]  # the dispatcher reports the first refusal
        return Denial(self.name, self.binding, message, reason)


def startup_taint_policy() -> Policy:
    """The shipped startup-taint policy and its binding, as written in deploy/."""
    docs = list(yaml.safe_load_all(STARTUP_TAINT_POLICY.read_text()))
    (policy,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    (binding,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    return Policy(policy, binding)
