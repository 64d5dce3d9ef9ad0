"""The test model of openai-agents-python's suite, trimmed to what the session tests use.

Source: openai/openai-agents-python, ``tests/fake_model.py`` (``FakeModel``,
``get_response_obj``; the stream events for message outputs only) and ``get_text_message``
from ``tests/test_responses.py``. MIT License, Copyright (c) 2025 OpenAI. Changed: the usage
details name ``cache_write_tokens``, required by the installed openai package.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from agents.agent_output import AgentOutputSchemaBase
from agents.handoffs import Handoff
from agents.items import (
    ModelResponse,
    TResponseInputItem,
    TResponseOutputItem,
    TResponseStreamEvent,
)
from agents.model_settings import ModelSettings
from agents.models.interface import Model, ModelTracing
from agents.tool import Tool
from agents.usage import Usage
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseInProgressEvent,
    ResponseOutputItem,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
)
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails


def get_text_message(content: str) -> ResponseOutputItem:
    return ResponseOutputMessage(
        id="1",
        type="message",
        role="assistant",
        content=[ResponseOutputText(text=content, type="output_text", annotations=[])],
        status="completed",
    )


class FakeModel(Model):
    def __init__(
        self,
        tracing_enabled: bool = False,
        initial_output: list[TResponseOutputItem] | Exception | None = None,
    ):
        if initial_output is None:
            initial_output = []
        self.turn_outputs: list[list[TResponseOutputItem] | Exception] = (
            [initial_output] if initial_output else []
        )
        self.tracing_enabled = tracing_enabled
        self.last_turn_args: dict[str, Any] = {}
        self.first_turn_args: dict[str, Any] | None = None
        self.hardcoded_usage: Usage | None = None

    def set_next_output(self, output: list[TResponseOutputItem] | Exception) -> None:
        self.turn_outputs.append(output)

    def get_next_output(self) -> list[TResponseOutputItem] | Exception:
        if not self.turn_outputs:
            return []
        return self.turn_outputs.pop(0)

    def _record(self, system_instructions: Any, input: Any, model_settings: Any, tools: Any,
                output_schema: Any, previous_response_id: Any, conversation_id: Any) -> None:
        turn_args = {
            "system_instructions": system_instructions,
            "input": input,
            "model_settings": model_settings,
            "tools": tools,
            "output_schema": output_schema,
            "previous_response_id": previous_response_id,
            "conversation_id": conversation_id,
        }
        if self.first_turn_args is None:
            self.first_turn_args = turn_args.copy()
        self.last_turn_args = turn_args

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: Any | None,
    ) -> ModelResponse:
        self._record(system_instructions, input, model_settings, tools, output_schema,
                     previous_response_id, conversation_id)
        output = self.get_next_output()
        if isinstance(output, Exception):
            raise output
        return ModelResponse(
            output=output, usage=self.hardcoded_usage or Usage(), response_id="resp-789"
        )

    async def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None = None,
        conversation_id: str | None = None,
        prompt: Any | None = None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        self._record(system_instructions, input, model_settings, tools, output_schema,
                     previous_response_id, conversation_id)
        output = self.get_next_output()
        if isinstance(output, Exception):
            raise output
        response = get_response_obj(output, usage=self.hardcoded_usage)
        seq = 0
        yield ResponseCreatedEvent(type="response.created", response=response, sequence_number=seq)
        seq += 1
        yield ResponseInProgressEvent(
            type="response.in_progress", response=response, sequence_number=seq
        )
        seq += 1
        for index, item in enumerate(output):
            yield ResponseOutputItemAddedEvent(
                type="response.output_item.added", item=item, output_index=index,
                sequence_number=seq,
            )
            seq += 1
            if isinstance(item, ResponseOutputMessage):
                for part_index, part in enumerate(item.content):
                    if not isinstance(part, ResponseOutputText):
                        continue
                    common = {"item_id": item.id, "output_index": index,
                              "content_index": part_index}
                    yield ResponseContentPartAddedEvent(
                        type="response.content_part.added", part=part, sequence_number=seq,
                        **common,
                    )
                    seq += 1
                    yield ResponseTextDeltaEvent(
                        type="response.output_text.delta", delta=part.text, logprobs=[],
                        sequence_number=seq, **common,
                    )
                    seq += 1
                    yield ResponseTextDoneEvent(
                        type="response.output_text.done", text=part.text, logprobs=[],
                        sequence_number=seq, **common,
                    )
                    seq += 1
                    yield ResponseContentPartDoneEvent(
                        type="response.content_part.done", part=part, sequence_number=seq,
                        **common,
                    )
                    seq += 1
            yield ResponseOutputItemDoneEvent(
                type="response.output_item.done", item=item, output_index=index,
                sequence_number=seq,
            )
            seq += 1
        yield ResponseCompletedEvent(
            type="response.completed", response=response, sequence_number=seq
        )


def get_response_obj(
    output: list[TResponseOutputItem],
    response_id: str | None = None,
    usage: Usage | None = None,
) -> Response:
    return Response(
        id=response_id or "resp-789",
        created_at=123,
        model="test_model",
        object="response",
        output=output,
        tool_choice="none",
        tools=[],
        top_p=None,
        parallel_tool_calls=False,
        usage=ResponseUsage(
            input_tokens=usage.input_tokens if usage else 0,
            output_tokens=usage.output_tokens if usage else 0,
            total_tokens=usage.total_tokens if usage else 0,
            input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=0),
            output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
        ),
    )
