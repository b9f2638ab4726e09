# Runs postal_config/console.rb's own logic (settings, raw message retention) without Postal: test_postal_config.py.
# Stand-ins for the few Postal names console.rb touches, so its own logic runs without Postal.
require "json"
require "stringio"
require "uri"
module ActiveRecord
  class RecordInvalid < StandardError; end
  class Base
    def self.transaction
      yield
    end
  end
end
module Postal
  class Error < StandardError; end
end
module Rails
  class Console; end # keeps the script's failed first run (no settings) from exiting
end
class Object
  def present?
    !(nil? || (respond_to?(:empty?) && empty?))
  end

  def blank?
    !present?
  end
end
class Route
  SPAM_MODES = %w[Mark Quarantine Fail].freeze
end
class HTTPEndpoint
  FORMATS = %w[Hash RawMessage].freeze
end
class FakeServer
  attr_accessor :raw_message_retention_days, :raw_message_retention_size, :message_retention_days, :updates

  def initialize(days, size)
    @raw_message_retention_days = days
    @raw_message_retention_size = size
    @message_retention_days = 60
    @updates = []
  end

  def update!(attrs)
    @updates << attrs
    attrs.each { |k, v| public_send("#{k}=", v) }
  end
end

$stderr = StringIO.new # the script's own complaint about the missing settings on load
load ARGV.fetch(0)
$stderr = STDERR
base = { "BRIDGE_URL" => "https://bridge.example.net", "POSTAL_SERVER" => "acme/main", "DOMAIN" => "example.com" }
results = JSON.parse(ARGV.fetch(1)).map do |c|
  begin
    settings = MailioBridgeSetup.read_settings(base.merge(c["env"]))
    server = FakeServer.new(c["days"], c["size"])
    out = StringIO.new
    $stdout = out
    2.times { MailioBridgeSetup.ensure_raw_retention(server, settings) }
    $stdout = STDOUT
    { "days" => server.raw_message_retention_days, "size" => server.raw_message_retention_size,
      "updates" => server.updates.length, "printed" => out.string, "webhook" => settings[:events_webhook] }
  rescue MailioBridgeSetup::Error => e
    $stdout = STDOUT
    { "error" => e.message }
  end
end
puts JSON.generate(results)
