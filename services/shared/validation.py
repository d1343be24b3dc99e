"""Request checks shared by every servicer: unknown fields, wire encoding, UTF-8, ranges and sizes."""

from __future__ import annotations

from google.protobuf import empty_pb2, message_factory, unknown_fields
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from services.shared.errors import InvalidArgument


def find_unknown_field(message: Message, path: str = "") -> str | None:
    """The dotted path of the first unknown field in `message` (recursively), or None.

    Clients built from a newer or foreign contract may send fields this server does not know;
    protobuf would drop them silently, so the server says so instead.
    """
    for unknown in unknown_fields.UnknownFieldSet(message):
        return f"{path}#{unknown.field_number}" if path else f"#{unknown.field_number}"
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        child_path = f"{path}.{field.name}" if path else field.name
        children = value if field.is_repeated else [value]
        for child in children:
            found = find_unknown_field(child, child_path)
            if found:
                return found
    return None


_F = FieldDescriptor
_WIRE_NAMES = {0: "varint", 1: "64-bit", 2: "length-delimited", 3: "group start", 4: "group end", 5: "32-bit"}
_WIRE_TYPE_OF = {
    **dict.fromkeys(
        (_F.TYPE_INT32, _F.TYPE_INT64, _F.TYPE_UINT32, _F.TYPE_UINT64, _F.TYPE_SINT32, _F.TYPE_SINT64,
         _F.TYPE_BOOL, _F.TYPE_ENUM), 0,
    ),
    **dict.fromkeys((_F.TYPE_FIXED64, _F.TYPE_SFIXED64, _F.TYPE_DOUBLE), 1),
    **dict.fromkeys((_F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_MESSAGE), 2),
    _F.TYPE_GROUP: 3,
    **dict.fromkeys((_F.TYPE_FIXED32, _F.TYPE_SFIXED32, _F.TYPE_FLOAT), 5),
}
_TYPE_NAMES = {
    getattr(_F, name): name.removeprefix("TYPE_").lower() for name in dir(_F) if name.startswith("TYPE_")
}
# Raw varints (read as unsigned 64-bit) a 32-bit field accepts: protobuf would truncate the others.
# int32 and enums sign-extend negative values to 64 bits; sint32 is zigzag-encoded in 32 bits.
_SIGNED_32 = (_F.TYPE_INT32, _F.TYPE_ENUM)
_UNSIGNED_32 = (_F.TYPE_UINT32, _F.TYPE_SINT32)


def _varint_fits(field_type: int, raw_value: int) -> bool:
    if field_type in _SIGNED_32:
        return raw_value < 2**31 or raw_value >= 2**64 - 2**31
    if field_type in _UNSIGNED_32:
        return raw_value < 2**32
    return True


def find_wire_problem(message_class: type[Message], data: bytes, path: str = "") -> str | None:
    """Say what is wrong with a parsed message's encoding, or None: the first known field sent with
    another wire type than its declared type's, or a varint too large for its 32-bit field.

    protobuf itself keeps the first as an unknown field and silently truncates the second, so the
    caller would hear "unknown field" or a range error about a value it never sent. `data` must
    already parse as `message_class`. Packed repeated scalars are not looked into.
    """
    try:
        raw_fields = unknown_fields.UnknownFieldSet(empty_pb2.Empty.FromString(data))
    except DecodeError:
        return None  # the caller's parse succeeded; nothing more precise to say
    return _wire_problem(message_class.DESCRIPTOR, raw_fields, path)


def _wire_problem(descriptor: Descriptor, raw_fields, path: str) -> str | None:
    for raw in raw_fields:
        field = descriptor.fields_by_number.get(raw.field_number)
        if field is None:
            continue  # unknown to this version: find_unknown_field names it
        name = f"{path}.{field.name}" if path else field.name
        expected = _WIRE_TYPE_OF[field.type]
        is_packed = raw.wire_type == 2 and field.is_repeated and expected in (0, 1, 5)
        if raw.wire_type != expected and not is_packed:
            return (
                f"{name}: sent with wire type {_WIRE_NAMES.get(raw.wire_type, raw.wire_type)}, but the field is "
                f"{_TYPE_NAMES[field.type]} ({_WIRE_NAMES[expected]})"
            )
        if raw.wire_type == 0 and not _varint_fits(field.type, raw.data):
            return f"{name}: {raw.data} does not fit in {_TYPE_NAMES[field.type]} (a 32-bit field)"
        if field.type == _F.TYPE_MESSAGE and raw.wire_type == 2:
            inner = find_wire_problem(message_factory.GetMessageClass(field.message_type), raw.data, name)
            if inner:
                return inner
    return None


def explain_decode_error(message_class: type[Message], data: bytes) -> str:
    """Name the top-level string field whose bytes are not UTF-8, for a readable error.

    Parsing `data` as Empty keeps every field as raw unknown bytes, so the offending field can be
    found without protobuf's own (field-less) UTF-8 error.
    """
    try:
        raw_fields = unknown_fields.UnknownFieldSet(empty_pb2.Empty.FromString(data))
    except DecodeError:
        return "request is not a valid protobuf message"
    by_number = message_class.DESCRIPTOR.fields_by_number
    for raw in raw_fields:
        field = by_number.get(raw.field_number)
        if field is None or not isinstance(raw.data, bytes):
            continue
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                raw.data.decode("utf-8")
            except UnicodeDecodeError:
                return f"{field.name}: not valid UTF-8"
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            try:
                field.message_type._concrete_class.FromString(raw.data)
            except DecodeError:
                inner = explain_decode_error(field.message_type._concrete_class, raw.data)
                return f"{field.name}.{inner}"
    return "request could not be parsed (malformed protobuf or invalid UTF-8)"


def check_text(field: str, value: str, *, max_bytes: int, may_be_empty: bool = False) -> None:
    """Raise InvalidArgument unless `value` is non-empty (if required) and at most max_bytes UTF-8."""
    if not value and not may_be_empty:
        raise InvalidArgument(field, "must not be empty")
    num_bytes = len(value.encode("utf-8"))
    if num_bytes > max_bytes:
        raise InvalidArgument(field, f"is {num_bytes} bytes, the limit is {max_bytes}")


def check_range(field: str, value: float, *, low: float, high: float) -> None:
    """Raise InvalidArgument unless low <= value <= high."""
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be in [{low}, {high}], got {value}")
