// aws-sdk-go-v2 with config.LoadDefaultConfig: STS GetCallerIdentity at the endpoint given as the
// only argument; prints one JSON line (what it got, or the error).
package main

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"strings"

	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/sts"
	"github.com/aws/smithy-go/middleware"
	smithyhttp "github.com/aws/smithy-go/transport/http"
)

// The SDK keeps its version unexported; its User-Agent says it ("aws-sdk-go-v2/1.17.1 …").
var version = "unknown"

func recordVersion(stack *middleware.Stack) error {
	return stack.Finalize.Add(middleware.FinalizeMiddlewareFunc("RecordVersion",
		func(ctx context.Context, in middleware.FinalizeInput, next middleware.FinalizeHandler) (
			middleware.FinalizeOutput, middleware.Metadata, error,
		) {
			if request, ok := in.Request.(*smithyhttp.Request); ok {
				version = sdkVersion(request.Header)
			}
			return next.HandleFinalize(ctx, in)
		}), middleware.After)
}

func sdkVersion(header http.Header) string {
	for _, part := range strings.Fields(header.Get("User-Agent")) {
		if strings.HasPrefix(part, "aws-sdk-go-v2/") {
			return strings.TrimPrefix(part, "aws-sdk-go-v2/")
		}
	}
	return "unknown"
}

func report(result map[string]string, failed bool) {
	result["version"] = version
	_ = json.NewEncoder(os.Stdout).Encode(result)
	if failed {
		os.Exit(1)
	}
}

func main() {
	ctx := context.Background()
	cfg, err := config.LoadDefaultConfig(ctx)
	if err != nil {
		report(map[string]string{"error": err.Error()}, true)
	}
	client := sts.NewFromConfig(cfg, func(o *sts.Options) {
		o.EndpointResolver = sts.EndpointResolverFromURL(os.Args[1])
		o.APIOptions = append(o.APIOptions, recordVersion)
	})
	identity, err := client.GetCallerIdentity(ctx, &sts.GetCallerIdentityInput{})
	if err != nil {
		report(map[string]string{"error": err.Error()}, true)
	}
	creds, err := cfg.Credentials.Retrieve(ctx)
	if err != nil {
		report(map[string]string{"error": err.Error()}, true)
	}
	report(map[string]string{
		"arn":        *identity.Arn,
		"access_key": creds.AccessKeyID,
		"provider":   creds.Source,
	}, false)
}
