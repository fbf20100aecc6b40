# RsbalancerCheck: makes `nginx -t` validate rsbalancer pool configs.
#
# lua-nginx-module does not run init_by_lua under `nginx -t`, so a bad pool config
# would only show at start or reload. nginx's Perl module (Debian:
# libnginx-mod-http-perl) runs `perl_require` while it parses the configuration,
# `nginx -t` included, and a `die` there fails the test with its message. Use:
#
#   load_module /usr/lib/nginx/modules/ngx_http_perl_module.so;
#   http {
#       perl_modules /usr/local/share/rsbalancer/perl;   # this file (make install;
#                                                        # the .deb: /usr/share/perl5, no line)
#       perl_require rsbalancer-llm.pm;                   # one line, below
#       ...
#
# where rsbalancer-llm.pm (in the same directory, or any perl_modules one) is
#
#   use RsbalancerCheck; RsbalancerCheck::config('/etc/nginx/rsbalancer.json'); 1;
#
# config(path [, cpath]) validates the file exactly as init() will, through
# rsbalancer.so's check_file (run by luajit; cpath: the directory holding
# rsbalancer.so, default luajit's own package.cpath, which on Debian holds both
# /usr/local/lib/lua/5.1 of `make install` and /usr/lib/<multiarch>/lua/5.1 of the
# .deb), and dies with the error, which
# names the field and the value. Without the Perl module nothing changes: init()
# still refuses a bad config at start and reload.
package RsbalancerCheck;

use strict;
use warnings;

my $LUA = <<'LUA';
local dir = os.getenv("RSB_CHECK_CPATH")
if dir and dir ~= "" then package.cpath = dir .. "/?.so;" .. package.cpath end
local ok, err = require("rsbalancer").check_file(os.getenv("RSB_CHECK_JSON"))
io.write(ok and "ok" or tostring(err))
os.exit(ok and 0 or 1)
LUA

sub config {
    my ($json, $cpath) = @_;
    local $ENV{RSB_CHECK_JSON} = $json;
    local $ENV{RSB_CHECK_CPATH} = $cpath // '';
    open(my $out, '-|', 'luajit', '-e', $LUA)
        or die "rsbalancer: cannot run luajit to check $json: $!\n";
    my $said = do { local $/; <$out> } // '';
    close($out);
    die "rsbalancer: $json: cannot check it (luajit exit status $?): $said\n"
        if $? != 0 && $said eq '';
    die "rsbalancer: $json: $said\n" if $? != 0;
    return 1;
}

1;
