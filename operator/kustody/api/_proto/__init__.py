"""Code generated from proto/ by `make proto` (grpc_tools.protoc); never edited by hand."""
