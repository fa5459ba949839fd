"""Tool calling: the grammar that enforces `required` and named tool choices, and parsers that
read tool calls out of a model's text (one per output format, in a registry)."""
from llmserve.tools.choice import ToolChoicePlan, plan_tool_choice
from llmserve.tools.parsers import ParsedCall, ParsedOutput, StreamingToolParser, ToolParser, get_tool_parser

__all__ = ["ParsedCall", "ParsedOutput", "StreamingToolParser", "ToolChoicePlan", "ToolParser", "get_tool_parser",
           "plan_tool_choice"]
